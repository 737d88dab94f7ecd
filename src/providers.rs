//! SMS and push providers: `simulated` (the design document's latencies), `webhook` (an
//! HTTP POST a real provider adapter receives), and `log`.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::config::{ProviderConfig, ProviderKind, ProvidersConfig};

/// What a message is for; the webhook's `kind` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    /// OTP by SMS to the customer.
    OtpSms,
    /// Parcel SMS to the receiver.
    ParcelSms,
    /// OTP by push to the customer.
    OtpPush,
    /// "Trip taken" push to the other offered drivers.
    TripTakenPush,
    /// Driver arrival estimate push to the customer.
    ArrivalPush,
}

/// One message handed to a provider; exactly the webhook's JSON body.
#[derive(Debug, Clone, Serialize)]
pub struct Message {
    /// What it is for.
    pub kind: MessageKind,
    /// The trip it is about.
    pub trip_id: String,
    /// Phone number or device token(s, comma-separated).
    pub to: String,
    /// Text.
    pub body: String,
    /// Same for every attempt of the same effect, so a provider can drop repeats.
    pub idempotency_key: String,
}

/// A provider call that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The simulated provider drew a failure.
    #[error("simulated provider failure")]
    Simulated,
    /// The webhook answered with a non-2xx status.
    #[error("webhook answered {0}")]
    Status(u16),
    /// The webhook could not be reached (no connection was made): nothing was sent.
    #[error("webhook call failed: {0}")]
    Transport(String),
    /// The connection failed once the request was on its way (reset, closed before an
    /// answer): the message may have been delivered all the same.
    #[error("webhook call failed: {0}")]
    Broken(String),
    /// No answer within `providers.*.timeout_ms`: the message may have been delivered
    /// all the same.
    #[error("webhook call failed: timed out after {0} ms (providers.*.timeout_ms)")]
    TimedOut(u128),
}

impl ProviderError {
    /// Whether the message may have reached the provider all the same: a call that timed
    /// out, or whose connection broke after it was sent, may have been handled (its next
    /// call is a repeat, not a retry).
    pub fn maybe_done(&self) -> bool {
        matches!(self, Self::TimedOut(_) | Self::Broken(_))
    }
}

/// A failed call: a timeout says so (with the limit); otherwise reqwest's message and its
/// causes ("error sending request for url (…)" alone does not say what failed).
fn transport_error(e: &reqwest::Error, timeout: Duration) -> ProviderError {
    // A connection never made (refused, or not within CONNECT_TIMEOUT) sent nothing: a
    // certain failure, whose next call is a retry.
    if e.is_timeout() && !e.is_connect() {
        return ProviderError::TimedOut(timeout.as_millis());
    }
    // reqwest names the URL in its text: a provider's key in its query stays out of the
    // failure reason, which is logged and kept in the effect's record.
    let mut text = e.to_string();
    if let Some(url) = e.url() {
        text = text.replace(url.as_str(), &crate::config::without_passwords(url.as_str()));
    }
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text = format!("{text}: {c}");
        cause = c.source();
    }
    if e.is_connect() || e.is_builder() {
        ProviderError::Transport(text)
    } else {
        ProviderError::Broken(text)
    }
}

/// Sends messages of one channel (SMS or push).
#[async_trait::async_trait]
pub trait Provider: Send + Sync {
    /// Hands `message` to the provider.
    async fn send(&self, message: &Message) -> Result<(), ProviderError>;
}

/// Sleeps `latency`, then fails with probability `failure_rate`.
#[derive(Debug)]
pub struct SimulatedProvider {
    latency: Duration,
    failure_rate: f64,
}

#[async_trait::async_trait]
impl Provider for SimulatedProvider {
    async fn send(&self, _message: &Message) -> Result<(), ProviderError> {
        tokio::time::sleep(self.latency).await;
        if self.failure_rate > 0.0 && rand::random::<f64>() < self.failure_rate {
            return Err(ProviderError::Simulated);
        }
        Ok(())
    }
}

/// POSTs the message as JSON to `url`, with an `Idempotency-Key` header as well.
#[derive(Debug)]
pub struct WebhookProvider {
    client: reqwest::Client,
    url: String,
    timeout: Duration,
}

#[async_trait::async_trait]
impl Provider for WebhookProvider {
    async fn send(&self, message: &Message) -> Result<(), ProviderError> {
        let response = self
            .client
            .post(&self.url)
            .timeout(self.timeout)
            .header("idempotency-key", &message.idempotency_key)
            .json(message)
            .send()
            .await
            .map_err(|e| transport_error(&e, self.timeout))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(ProviderError::Status(response.status().as_u16()))
        }
    }
}

/// Logs the message and succeeds.
#[derive(Debug)]
pub struct LogProvider;

#[async_trait::async_trait]
impl Provider for LogProvider {
    async fn send(&self, message: &Message) -> Result<(), ProviderError> {
        tracing::info!(kind = ?message.kind, trip_id = %message.trip_id, to = %message.to, body = %message.body, "provider message");
        Ok(())
    }
}

/// The SMS and push providers the side effects use.
#[derive(Clone)]
pub struct Providers {
    /// OTP and parcel SMS.
    pub sms: Arc<dyn Provider>,
    /// Pushes.
    pub push: Arc<dyn Provider>,
}

impl Providers {
    /// Builds both providers from `[providers]`. Webhooks speak HTTP or HTTPS (rustls,
    /// verifying against the system's roots, or only against `ca_file` when one is given);
    /// an unreadable or invalid `ca_file` is an error naming its key.
    pub fn from_config(config: &ProvidersConfig) -> Result<Self, (&'static str, String)> {
        // One HTTP client (one connection pool) for the webhooks that trust the same roots.
        let shared = http_client(None).map_err(|e| ("providers", e))?;
        let client_for = |key: &'static str, p: &ProviderConfig| match &p.ca_file {
            Some(path) if p.kind == ProviderKind::Webhook => http_client(Some(path)).map_err(|e| (key, e)),
            _ => Ok(shared.clone()),
        };
        Ok(Self {
            sms: build(&config.sms, &client_for("providers.sms.ca_file", &config.sms)?),
            push: build(&config.push, &client_for("providers.push.ca_file", &config.push)?),
        })
    }
}

/// Bound on a webhook's TCP and TLS connect (within `timeout_ms`, which bounds the whole
/// call): a provider host that does not answer fails as not reached, nothing sent.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// An HTTP client over rustls: the system's roots, or only the CA certificates of
/// `ca_file` (PEM).
fn http_client(ca_file: Option<&std::path::Path>) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT);
    let named = |e: reqwest::Error| match ca_file {
        // A certificate that parsed but that rustls refuses (a truncated one) fails here.
        Some(path) => format!("{}: HTTP client with its certificates: {e:#}", path.display()),
        None => format!("HTTP client: {e:#}"),
    };
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("{}: not a PEM certificate: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("{}: no certificate in it", path.display()));
        }
        builder = builder.tls_built_in_root_certs(false);
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(named)
}

fn build(config: &ProviderConfig, client: &reqwest::Client) -> Arc<dyn Provider> {
    match config.kind {
        ProviderKind::Simulated => Arc::new(SimulatedProvider {
            latency: Duration::from_millis(config.latency_ms),
            failure_rate: config.failure_rate,
        }),
        ProviderKind::Webhook => Arc::new(WebhookProvider {
            client: client.clone(),
            url: config.url.clone(),
            timeout: Duration::from_millis(config.timeout_ms),
        }),
        ProviderKind::Log => Arc::new(LogProvider),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A provider that never answers is named as a timeout, one that is not there by its
    /// cause: "error sending request" alone would look the same for both.
    #[tokio::test]
    async fn a_failed_call_says_what_failed() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let message = Message {
            kind: MessageKind::OtpSms,
            trip_id: "t".into(),
            to: "+1".into(),
            body: "b".into(),
            idempotency_key: "t:otp_sms".into(),
        };
        let provider = |url: String| WebhookProvider {
            client: reqwest::Client::new(),
            url,
            timeout: Duration::from_millis(200),
        };
        let err = provider(format!("http://{}/sms", silent.local_addr().unwrap()))
            .send(&message)
            .await
            .unwrap_err();
        // Sent, perhaps handled: its outcome is unknown.
        assert!(err.maybe_done());
        let err = err.to_string();
        assert!(err.contains("timed out after 200 ms"), "{err}");
        let port = silent.local_addr().unwrap().port();
        drop(silent);
        let err = provider(format!("http://127.0.0.1:{port}/sms?api_key=hunter2"))
            .send(&message)
            .await
            .unwrap_err();
        assert!(!err.maybe_done());
        let err = err.to_string();
        assert!(err.to_lowercase().contains("refused"), "{err}");
        // The reason is logged and kept: a key in the URL's query is not in it.
        assert!(err.contains("/sms?api_key=***") && !err.contains("hunter2"), "{err}");
        // A provider that reads the request and closes the connection without an answer
        // may have handled it: unknown as well.
        let closing = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/sms", closing.local_addr().unwrap());
        let reader = std::thread::spawn(move || {
            use std::io::Read;
            let (mut conn, _) = closing.accept().unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.ends_with(b"}") {
                let n = conn.read(&mut buf).unwrap();
                assert!(n > 0, "the request ended early");
                request.extend_from_slice(&buf[..n]);
            }
        });
        let err = provider(url).send(&message).await.unwrap_err();
        reader.join().unwrap();
        assert!(err.maybe_done(), "{err}");
    }
}
