//! Bearer tokens: tripgate's own HS256 JWTs with `sub`, `role` and `exp` (`nbf` honoured
//! when present), and — in front of the existing backend — the backend's own RS256 / ES256
//! tokens ([`BackendKeys`]: a PEM public key or a JWKS URL, the role in a configurable claim).

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::domain::now_ms;

/// Who a token speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A driver: may accept and reject trips.
    Driver,
    /// A customer: may create, cancel and read their trips.
    Customer,
    /// Operations: admin listener.
    Admin,
}

impl Role {
    /// Parses a role claim's value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "driver" => Some(Self::Driver),
            "customer" => Some(Self::Customer),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }

    /// The `role` claim's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Driver => "driver",
            Self::Customer => "customer",
            Self::Admin => "admin",
        }
    }
}

/// The claims tripgate issues and accepts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user's id (`admin` for admin tokens).
    pub sub: String,
    /// The user's role.
    pub role: Role,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Issued at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Not valid before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

/// The `kind` of a console session token.
const SESSION_KIND: &str = "tripgate-console";

/// A console session (the cookie the ops console logs in with).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    /// The admin's name (the audit's actor).
    pub sub: String,
    /// Expiry: the token the admin logged in with expires then too.
    pub exp: u64,
    /// The CSRF token every state-changing call of this session must send.
    pub csrf: String,
    /// Always [`SESSION_KIND`].
    pub kind: String,
}

/// Signs and verifies tokens with one HS256 key.
#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl_s: u64,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKeys(..)")
    }
}

impl TokenKeys {
    /// Keys for `secret`; minted tokens live `ttl_s` seconds.
    pub fn new(secret: &str, ttl_s: u64) -> Self {
        // Only HS256: a token signed with anything else (`none`, RS256 with our secret as a
        // "public key") is refused before its signature is even looked at.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = 5;
        Self {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            validation,
            ttl_s,
        }
    }

    /// A token for `sub` in `role`, valid from now for the configured lifetime.
    pub fn mint(&self, sub: &str, role: Role) -> Result<String, jsonwebtoken::errors::Error> {
        let now = now_s();
        self.sign(&Claims {
            sub: sub.to_owned(),
            role,
            exp: now + self.ttl_s,
            iat: Some(now),
            nbf: None,
        })
    }

    /// Signs arbitrary claims (tests use it for expired and not-yet-valid tokens).
    pub fn sign(&self, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
    }

    /// A console session for `sub` until `exp` (s) carrying its CSRF token: an HS256 JWT of
    /// its own kind (no `role`, so it is never taken for a bearer token, and a bearer token
    /// is never taken for a session).
    pub fn sign_session(&self, sub: &str, exp: u64, csrf: &str) -> Result<String, jsonwebtoken::errors::Error> {
        let claims = Session {
            sub: sub.to_owned(),
            exp,
            csrf: csrf.to_owned(),
            kind: SESSION_KIND.to_owned(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
    }

    /// A valid console session, or `None`.
    pub fn verify_session(&self, token: &str) -> Option<Session> {
        jsonwebtoken::decode::<Session>(token, &self.decoding, &self.validation)
            .ok()
            .map(|data| data.claims)
            .filter(|s| s.kind == SESSION_KIND && !s.csrf.is_empty())
    }

    /// The expiry (s) of a valid bearer token of ours.
    pub fn expiry(&self, token: &str) -> Option<u64> {
        self.verify(token).map(|c| c.exp)
    }

    /// The claims of a valid token, or `None` for anything else.
    pub fn verify(&self, token: &str) -> Option<Claims> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .ok()
            .map(|data| data.claims)
    }
}

/// Verifies the backend's own tokens: RS256 or ES256, against one PEM public key or the
/// keys of a JWKS URL (cached by `kid`; an unknown `kid` fetches the set again, at most every
/// [`BackendKeys::REFETCH`]). The token's algorithm must be the key's: a token cannot pick
/// how it is checked.
pub struct BackendKeys {
    source: KeySource,
    role_claim: String,
    audience: String,
    issuer: String,
}

enum KeySource {
    Static(DecodingKey, Algorithm),
    Jwks(Jwks),
}

struct Jwks {
    url: String,
    http: reqwest::Client,
    keys: std::sync::RwLock<std::collections::HashMap<String, (DecodingKey, Algorithm)>>,
    fetched: tokio::sync::Mutex<Option<std::time::Instant>>,
}

impl std::fmt::Debug for BackendKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackendKeys(..)")
    }
}

impl BackendKeys {
    /// Shortest time between two fetches of the JWKS.
    pub const REFETCH: std::time::Duration = std::time::Duration::from_secs(1);
    /// How long fetched keys are trusted before the set is fetched again (so a key removed
    /// from the JWKS stops working).
    pub const KEYS_TTL: std::time::Duration = std::time::Duration::from_secs(600);

    /// The backend's keys of `auth`, if it names any (`Err` names the key and the reason).
    pub fn from_config(auth: &crate::config::AuthConfig) -> Result<Option<Self>, (&'static str, String)> {
        let source = if !auth.public_key_file.is_empty() {
            let pem = std::fs::read(&auth.public_key_file)
                .map_err(|e| ("auth.public_key_file", format!("{}: {e}", auth.public_key_file)))?;
            let refused = |why: &str| Err(("auth.public_key_file", format!("{}: {why}", auth.public_key_file)));
            // What the PEM holds: a private key (Passport's oauth-private.key beside the
            // public one) would load and then verify nothing.
            let block = pem::parse(&pem).ok();
            if block.as_ref().is_some_and(|b| b.tag().contains("PRIVATE")) {
                return refused("a private key; give the public one (e.g. Passport's oauth-public.key)");
            }
            if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                KeySource::Static(key, Algorithm::RS256)
            } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
                // ES256 is P-256: its curve's OID is in the key's DER.
                const P256_OID: [u8; 10] = [0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];
                if !block.is_some_and(|b| b.contents().windows(P256_OID.len()).any(|w| w == P256_OID)) {
                    return refused("an EC key of another curve than P-256 (ES256)");
                }
                KeySource::Static(key, Algorithm::ES256)
            } else {
                return Err((
                    "auth.public_key_file",
                    format!("{} is not a PEM RSA or EC public key", auth.public_key_file),
                ));
            }
        } else if !auth.jwks_url.is_empty() {
            KeySource::Jwks(Jwks {
                url: auth.jwks_url.clone(),
                http: reqwest::Client::builder()
                    .timeout(std::time::Duration::from_secs(3))
                    .build()
                    .map_err(|e| ("auth.jwks_url", e.to_string()))?,
                keys: Default::default(),
                fetched: Default::default(),
            })
        } else {
            return Ok(None);
        };
        Ok(Some(Self {
            source,
            role_claim: auth.role_claim.clone(),
            audience: auth.audience.clone(),
            issuer: auth.issuer.clone(),
        }))
    }

    /// The subject and role of a valid backend token, or `None`.
    pub async fn verify(&self, token: &str) -> Option<AuthUser> {
        let header = jsonwebtoken::decode_header(token).ok()?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return None;
        }
        let (key, alg) = match &self.source {
            KeySource::Static(key, alg) => (key.clone(), *alg),
            KeySource::Jwks(jwks) => jwks.key(header.kid.as_deref()?).await?,
        };
        if alg != header.alg {
            return None;
        }
        let mut validation = Validation::new(alg);
        // A configured audience or issuer is required, not only checked when present
        // (jsonwebtoken checks `aud`/`iss` only in a token that carries them).
        let mut required = vec!["exp", "sub"];
        if !self.audience.is_empty() {
            required.push("aud");
        }
        if !self.issuer.is_empty() {
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        validation.validate_nbf = true;
        validation.leeway = 5;
        // Passport puts the client id in `aud`: checked when configured, else accepted.
        if self.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&[&self.audience]);
        }
        if !self.issuer.is_empty() {
            validation.set_issuer(&[&self.issuer]);
        }
        let claims = jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)
            .ok()?
            .claims;
        let id = match &claims["sub"] {
            serde_json::Value::String(s) if !s.is_empty() => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            _ => return None,
        };
        let role = Role::parse(claims.get(&self.role_claim)?.as_str()?)?;
        Some(AuthUser { id, role })
    }
}

impl Jwks {
    /// The key for `kid`, fetching the set again when it is unknown or the keys are older
    /// than [`BackendKeys::KEYS_TTL`].
    async fn key(&self, kid: &str) -> Option<(DecodingKey, Algorithm)> {
        let fresh =
            |fetched: &Option<std::time::Instant>| fetched.is_some_and(|at| at.elapsed() < BackendKeys::KEYS_TTL);
        if let Some(found) = self.cached(kid) {
            match self.fetched.try_lock() {
                Ok(fetched) if fresh(&fetched) => return Some(found),
                // A fetch is under way (an unknown kid's, perhaps a slow or unanswering
                // JWKS endpoint, perhaps a stranger's made-up kid): a key we know serves
                // meanwhile instead of waiting for it.
                Err(_) => return Some(found),
                // Old keys and no fetch: this request fetches.
                Ok(_) => {}
            }
        }
        let mut fetched = self.fetched.lock().await;
        if fresh(&fetched)
            && let Some(found) = self.cached(kid)
        {
            return Some(found);
        }
        if fetched.is_some_and(|at| at.elapsed() < BackendKeys::REFETCH) {
            return None;
        }
        *fetched = Some(std::time::Instant::now());
        let set: serde_json::Value =
            match async { self.http.get(&self.url).send().await?.error_for_status()?.json().await }.await {
                Ok(set) => set,
                Err(e) => {
                    // The keys we had stay usable while the endpoint is down.
                    let (url, error) = (
                        crate::config::without_passwords(&self.url),
                        crate::config::without_passwords(&e.to_string()),
                    );
                    tracing::warn!(%url, %error, "JWKS not fetched");
                    return self.cached(kid);
                }
            };
        let Some(entries) = set["keys"].as_array() else {
            tracing::warn!(url = %crate::config::without_passwords(&self.url), "JWKS without a keys array; the keys we had stay");
            return self.cached(kid);
        };
        // Each key on its own: one this gateway cannot use (another curve, an encryption
        // key, a key type it does not know) is skipped, not the whole set (RFC 7517 §5).
        let keys = entries
            .iter()
            .filter_map(|entry| serde_json::from_value::<jsonwebtoken::jwk::Jwk>(entry.clone()).ok())
            .filter_map(|jwk| {
                let kid = jwk.common.key_id.clone()?;
                if matches!(
                    jwk.common.public_key_use,
                    Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
                ) {
                    return None;
                }
                let alg = match &jwk.algorithm {
                    jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                    jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(ec)
                        if ec.curve == jsonwebtoken::jwk::EllipticCurve::P256 =>
                    {
                        Algorithm::ES256
                    }
                    _ => return None,
                };
                Some((kid, (DecodingKey::from_jwk(&jwk).ok()?, alg)))
            })
            .collect();
        if let Ok(mut cache) = self.keys.write() {
            *cache = keys;
        }
        self.cached(kid)
    }

    fn cached(&self, kid: &str) -> Option<(DecodingKey, Algorithm)> {
        self.keys.read().ok()?.get(kid).cloned()
    }
}

/// The authenticated caller, from a verified token: set as a request extension by the
/// auth layer (the rollout router buckets by its id) and copied onto the response for the
/// log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthUser {
    /// Token subject: the user's id.
    pub id: String,
    /// Token role.
    pub role: Role,
}

/// Seconds since the Unix epoch, as token times are written (from the one clock).
pub fn now_s() -> u64 {
    u64::try_from(now_ms() / 1000).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let keys = TokenKeys::new("0123456789abcdef", 60);
        let token = keys.mint("d1", Role::Driver).unwrap();
        let claims = keys.verify(&token).unwrap();
        assert_eq!((claims.sub.as_str(), claims.role), ("d1", Role::Driver));

        let other = TokenKeys::new("another-secret-0123", 60);
        assert!(other.verify(&token).is_none(), "wrong key");

        let now = now_s();
        let expired = keys
            .sign(&Claims {
                sub: "d1".into(),
                role: Role::Driver,
                exp: now - 60,
                iat: None,
                nbf: None,
            })
            .unwrap();
        assert!(keys.verify(&expired).is_none(), "expired");
        let early = keys
            .sign(&Claims {
                sub: "d1".into(),
                role: Role::Driver,
                exp: now + 600,
                iat: None,
                nbf: Some(now + 300),
            })
            .unwrap();
        assert!(keys.verify(&early).is_none(), "not yet valid");

        // alg=none: header {"alg":"none"}, same claims, empty signature.
        let none = format!(
            "{}.{}.",
            b64("{\"alg\":\"none\",\"typ\":\"JWT\"}"),
            b64(&format!("{{\"sub\":\"d1\",\"role\":\"driver\",\"exp\":{}}}", now + 600))
        );
        assert!(keys.verify(&none).is_none(), "alg none");
        // RS/HS confusion: a header claiming RS256 over a valid HMAC of our own secret.
        let message = format!(
            "{}.{}",
            b64("{\"alg\":\"RS256\",\"typ\":\"JWT\"}"),
            b64(&format!("{{\"sub\":\"d1\",\"role\":\"driver\",\"exp\":{}}}", now + 600))
        );
        let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &keys.encoding, Algorithm::HS256).unwrap();
        let confused = format!("{message}.{signature}");
        assert!(keys.verify(&confused).is_none(), "RS256 header refused");
        let honest = format!(
            "{}.{}",
            b64("{\"alg\":\"HS256\",\"typ\":\"JWT\"}"),
            b64(&format!("{{\"sub\":\"d1\",\"role\":\"driver\",\"exp\":{}}}", now + 600))
        );
        let signature = jsonwebtoken::crypto::sign(honest.as_bytes(), &keys.encoding, Algorithm::HS256).unwrap();
        assert!(
            keys.verify(&format!("{honest}.{signature}")).is_some(),
            "the same, honestly labelled, passes"
        );
        assert!(keys.verify("garbage").is_none());
    }

    /// A JWKS whose cache holds `kid` (as fetched long ago) and whose endpoint is `url`.
    fn jwks_knowing(kid: &str, url: String) -> Jwks {
        let key = (DecodingKey::from_secret(b"cached-key"), Algorithm::RS256);
        Jwks {
            url,
            http: reqwest::Client::new(),
            keys: std::sync::RwLock::new([(kid.to_owned(), key)].into()),
            fetched: tokio::sync::Mutex::new(None),
        }
    }

    #[tokio::test]
    async fn the_keys_we_had_serve_while_the_jwks_endpoint_is_down_or_broken() {
        // Down: nothing listens there.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let down = format!("http://{}/jwks", closed.local_addr().unwrap());
        drop(closed);
        let jwks = jwks_knowing("k1", down);
        let (_, alg) = jwks.key("k1").await.expect("a cached key, its refresh failed");
        assert_eq!(alg, Algorithm::RS256);
        assert!(jwks.key("k2").await.is_none(), "an unknown kid stays unknown");
        assert!(jwks.key("k1").await.is_some(), "and the cached key keeps serving");

        // Broken: it answers, but without a keys array.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let broken = format!("http://{}/jwks", listener.local_addr().unwrap());
        let app = axum::Router::new().route(
            "/jwks",
            axum::routing::get(|| async { axum::Json(serde_json::json!({"nope": 1})) }),
        );
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let jwks = jwks_knowing("k1", broken);
        assert!(
            jwks.key("k1").await.is_some(),
            "a set without keys does not empty the cache"
        );
        assert!(jwks.fetched.lock().await.is_some(), "the set was fetched");
        server.abort();
    }

    fn b64(s: &str) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let bytes = s.as_bytes();
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}
