//! Trip acceptance: what both cohorts share — the command, the pre-checks, the reject, the
//! reply, the `tower::Service` that runs a command on its own task — and the one thing that
//! differs, a [`Strategy`], side by side in [`legacy`] and [`atomic_async`].
//!
//! The rollout router (`crate::rollout`) holds both services and sends each parsed,
//! authenticated [`AcceptCommand`] to one of them.

pub mod atomic_async;
pub mod legacy;

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use serde_json::{Map, Value};

use crate::auth::Role;
use crate::domain::{Cohort, TripAction};
use crate::error::{ApiError, FieldError, Outcome};
use crate::storage::Storage;
use crate::storage::assign::AssignOutcome;
use crate::storage::users::KnownUsers;

/// One driver request, after authentication and validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptCommand {
    /// The acting driver: always the token's subject, never from the body.
    pub driver_id: String,
    /// The trip (a UUID).
    pub trip_id: String,
    /// Accept or reject.
    pub action: TripAction,
    /// When the request arrived (ms), for OTP delivery time.
    pub received_at_ms: i64,
    /// False when the auth layer left settling that the driver is an active driver to
    /// the accept (a driver it had not seen within `auth.user_cache_ms`): the atomic_async
    /// statement does it on the way, anything else by [`check_driver`] first.
    pub driver_checked: bool,
}

/// How one cohort takes a trip: the part of an accept that differs between cohorts.
pub trait Strategy: Send + Sync + 'static {
    /// The cohort this strategy serves (written on the trip, its job and its effects).
    const COHORT: Cohort;

    /// Takes the trip for the command's driver, or says why not; settles, unless
    /// `cmd.driver_checked`, that the driver is an active driver (`users` remembers what
    /// was found).
    fn accept(
        &self,
        cmd: AcceptCommand,
        users: &KnownUsers,
    ) -> impl Future<Output = Result<AcceptReply, ApiError>> + Send;

    /// The storage the shared steps (reject) use.
    fn store(&self) -> &Storage;
}

/// A cohort's accept service: a rejection is recorded the same way in both cohorts; an
/// accept goes to the strategy `S`.
pub struct Accept<S> {
    strategy: Arc<S>,
    users: Arc<KnownUsers>,
    tasks: AcceptTasks,
}

impl<S> Clone for Accept<S> {
    fn clone(&self) -> Self {
        Self {
            strategy: self.strategy.clone(),
            users: self.users.clone(),
            tasks: self.tasks.clone(),
        }
    }
}

impl<S: Strategy> Accept<S> {
    /// The service over `strategy` (drivers left unchecked are looked up every time).
    pub fn from_strategy(strategy: S) -> Self {
        Self {
            strategy: Arc::new(strategy),
            users: Arc::new(KnownUsers::new(std::time::Duration::ZERO)),
            tasks: AcceptTasks::default(),
        }
    }

    /// The same, remembering the drivers it finds in `users` (the auth layer's cache).
    pub fn with_known_users(self, users: Arc<KnownUsers>) -> Self {
        Self { users, ..self }
    }

    /// The same, its requests' tasks counted in (and cut by) `tasks`.
    pub fn with_tasks(self, tasks: AcceptTasks) -> Self {
        Self { tasks, ..self }
    }
}

/// The accepts' own tasks (they outlive a client that hangs up), so that a shutdown can
/// end those still running past its grace — a legacy accept mid-way through its inline
/// side effects — and know they ended before it gives their jobs back to the queue.
#[derive(Clone)]
pub struct AcceptTasks(Arc<TasksInner>);

struct TasksInner {
    cut: tokio::sync::watch::Sender<bool>,
    /// One clone per running task.
    live: Arc<()>,
}

impl Default for AcceptTasks {
    fn default() -> Self {
        Self(Arc::new(TasksInner {
            cut: tokio::sync::watch::channel(false).0,
            live: Arc::new(()),
        }))
    }
}

impl AcceptTasks {
    /// Lets the running accepts finish until `grace_end`, then ends those still running
    /// (answered 503 if anyone still listens) and waits, up to `within`, until their tasks
    /// are gone. True when they are.
    pub async fn finish_or_cut(&self, grace_end: tokio::time::Instant, within: std::time::Duration) -> bool {
        if self.wait_until(grace_end).await {
            return true;
        }
        self.0.cut.send_replace(true);
        self.wait_until(tokio::time::Instant::now() + within).await
    }

    /// Waits until no accept runs (true), or `until`.
    async fn wait_until(&self, until: tokio::time::Instant) -> bool {
        while Arc::strong_count(&self.0.live) > 1 {
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        true
    }
}

impl<S: Strategy> tower::Service<AcceptCommand> for Accept<S> {
    type Response = AcceptReply;
    type Error = ApiError;
    type Future = BoxFuture<'static, Result<AcceptReply, ApiError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ApiError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, cmd: AcceptCommand) -> Self::Future {
        let (strategy, users) = (self.strategy.clone(), self.users.clone());
        let (mut cut, live) = (self.tasks.0.cut.subscribe(), self.tasks.0.live.clone());
        // On its own task: a driver app that hangs up mid-request must not cut a lock from
        // its accept, a transaction from its job, or legacy's effects in half. Only a
        // shutdown past its grace does (`AcceptTasks::cut_and_wait`).
        let task = tokio::spawn(async move {
            let _live = live;
            let work = async {
                match cmd.action {
                    TripAction::Rejected => {
                        check_driver(&users, strategy.store(), &cmd).await?;
                        reject(strategy.store(), &cmd).await
                    }
                    TripAction::Accepted => strategy.accept(cmd, &users).await,
                }
            };
            tokio::select! {
                reply = work => reply,
                // (A sender gone is no cut.)
                Ok(_) = cut.wait_for(|cut| *cut) => Err(ApiError::Unavailable("shut down mid-request".into())),
            }
        });
        Box::pin(async move {
            task.await
                .map_err(|e| ApiError::Internal(format!("accept task failed: {e}")))?
        })
    }
}

/// A successful answer: 200 with `default_update_200`.
#[derive(Debug, Clone, PartialEq)]
pub struct AcceptReply {
    /// accepted | rejected | retry
    pub outcome: Outcome,
    /// For a person.
    pub message: &'static str,
    /// The trip (full on legacy, minimal on atomic_async), or null for a reject.
    pub data: Value,
}

impl AcceptReply {
    fn rejected() -> Self {
        Self {
            outcome: Outcome::Rejected,
            message: "Trip request rejected.",
            data: Value::Null,
        }
    }
}

/// Parses the request body `{"trip_request_id": "<uuid>", "action": "accepted"|"rejected"}`,
/// naming every invalid field. Returns the trip id and the action.
pub fn parse_request(body: &[u8]) -> Result<(String, TripAction), ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("body", format!("The request body is not valid JSON: {e}")))?;
    let Value::Object(fields) = value else {
        return Err(ApiError::invalid("body", "The request body must be a JSON object."));
    };
    let mut errors = Vec::new();
    let trip_id = uuid_field(&fields, "trip_request_id", &mut errors);
    let action = match fields.get("action") {
        None | Some(Value::Null) => {
            errors.push(FieldError::new("action", "The action field is required."));
            None
        }
        Some(Value::String(s)) if TripAction::parse(s).is_some() => TripAction::parse(s),
        Some(_) => {
            errors.push(FieldError::new("action", "The action must be accepted or rejected."));
            None
        }
    };
    match (trip_id, action) {
        (Some(t), Some(a)) if errors.is_empty() => Ok((t, a)),
        _ => Err(ApiError::Invalid(errors)),
    }
}

/// A required UUID string field, normalised to lowercase hyphenated form.
pub fn uuid_field(fields: &Map<String, Value>, name: &str, errors: &mut Vec<FieldError>) -> Option<String> {
    match fields.get(name) {
        None | Some(Value::Null) => {
            errors.push(FieldError::new(name, format!("The {name} field is required.")));
            None
        }
        Some(Value::String(s)) => match uuid::Uuid::parse_str(s) {
            Ok(id) => Some(id.to_string()),
            Err(_) => {
                errors.push(FieldError::new(name, format!("The {name} must be a valid UUID.")));
                None
            }
        },
        Some(_) => {
            errors.push(FieldError::new(name, format!("The {name} must be a string.")));
            None
        }
    }
}

/// Settles that the command's driver is an active driver when the auth layer left it to
/// the accept (`driver_checked` false): one lookup, remembered in `users`. 401 if not.
pub(crate) async fn check_driver(users: &KnownUsers, store: &Storage, cmd: &AcceptCommand) -> Result<(), ApiError> {
    if cmd.driver_checked {
        return Ok(());
    }
    match users.user_type(store, &cmd.driver_id).await? {
        Some(kind) if kind == Role::Driver.as_str() => Ok(()),
        _ => Err(ApiError::Unauthorized),
    }
}

/// A driver declines an offer: recorded, 200. Same in both cohorts. Only a pending trip
/// without a driver is an offer (SPEC §5's rows hold for both actions, and a refused
/// request writes nothing): one the driver has already accepted is refused as not pending
/// — declining it would answer "rejected" while the trip stays theirs and the customer
/// waits for them (releasing an accepted trip is the backend's cancel, not this route) —,
/// one another driver has as taken, a cancelled one as not pending.
pub(crate) async fn reject(store: &Storage, cmd: &AcceptCommand) -> Result<AcceptReply, ApiError> {
    not_an_offer(store, cmd).await?;
    if !store.record_rejection(&cmd.trip_id, &cmd.driver_id).await? {
        // Nothing written: taken or cancelled since (answered as if it had been before),
        // or declined before (a repeat, answered as the first).
        not_an_offer(store, cmd).await?;
    }
    Ok(AcceptReply::rejected())
}

/// Why the trip is no offer to decline for the driver, if it is not.
async fn not_an_offer(store: &Storage, cmd: &AcceptCommand) -> Result<(), ApiError> {
    let trip = store.trip_snapshot(&cmd.trip_id).await?.ok_or(ApiError::TripNotFound)?;
    match trip.driver_id.as_deref() {
        Some(d) if d == cmd.driver_id => Err(ApiError::TripNotPending),
        Some(_) => Err(ApiError::TripTaken),
        None if !trip.is_open() => Err(ApiError::TripNotPending),
        None => Ok(()),
    }
}

/// The error for an accept transaction that did not commit.
pub(crate) fn refusal(outcome: AssignOutcome) -> ApiError {
    match outcome {
        AssignOutcome::NotFound => ApiError::TripNotFound,
        AssignOutcome::NotPending => ApiError::TripNotPending,
        AssignOutcome::DriverBusy => ApiError::DriverUnavailable,
        AssignOutcome::VehicleMismatch => ApiError::VehicleMismatch,
        AssignOutcome::Taken | AssignOutcome::AlreadyMine => ApiError::TripTaken,
        AssignOutcome::UnknownDriver => ApiError::Unauthorized,
        AssignOutcome::Accepted { .. } => ApiError::Internal("accepted trip treated as a refusal".into()),
    }
}

/// A four-digit OTP.
pub(crate) fn new_otp() -> String {
    format!("{:04}", rand::random_range(0..10_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codes(body: &str) -> Vec<String> {
        match parse_request(body.as_bytes()) {
            Err(ApiError::Invalid(errors)) => errors.into_iter().map(|e| e.error_code).collect(),
            other => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn request_validation_names_fields() {
        let id = "6f1c2b8e-7a8e-4a3e-9d7c-6a0c1f7b2d11";
        let ok = parse_request(format!(r#"{{"trip_request_id":"{id}","action":"accepted"}}"#).as_bytes()).unwrap();
        assert_eq!(ok, (id.to_string(), TripAction::Accepted));
        assert_eq!(codes("{"), ["body"]);
        assert_eq!(codes("[]"), ["body"]);
        assert_eq!(codes("{}"), ["trip_request_id", "action"]);
        assert_eq!(
            codes(r#"{"trip_request_id":"nope","action":"accepted"}"#),
            ["trip_request_id"]
        );
        assert_eq!(
            codes(&format!(r#"{{"trip_request_id":"{id}","action":"maybe"}}"#)),
            ["action"]
        );
        assert_eq!(
            codes(r#"{"trip_request_id":7,"action":1}"#),
            ["trip_request_id", "action"]
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]

        /// The driver request decoding on any bytes, and on JSON objects made of the
        /// request's own fields with values of every kind: a valid request with a canonical
        /// UUID, or named field errors, never a panic or another error. This is the request
        /// fuzz target's check (`tests/fuzz.sh`), run on every test run.
        #[test]
        fn decoding_gives_a_canonical_id_or_named_errors(body in request_bodies()) {
            match parse_request(&body) {
                Ok((trip_id, _)) => proptest::prop_assert_eq!(
                    uuid::Uuid::parse_str(&trip_id).map(|u| u.to_string()).ok(),
                    Some(trip_id)
                ),
                Err(ApiError::Invalid(errors)) => proptest::prop_assert!(!errors.is_empty()),
                Err(other) => proptest::prop_assert!(false, "unexpected error {other:?}"),
            }
        }
    }

    /// Raw bytes, or a request object whose two fields are each right, nearly right, of
    /// another type or missing, with other fields beside them.
    fn request_bodies() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        use serde_json::json;
        let trip_id = prop_oneof![
            4 => Just(json!("6f1c2b8e-7a8e-4a3e-9d7c-6a0c1f7b2d11")),
            1 => Just(json!("6F1C2B8E-7A8E-4A3E-9D7C-6A0C1F7B2D11")),
            1 => Just(json!("6f1c2b8e7a8e4a3e9d7c6a0c1f7b2d11")),
            1 => Just(json!("{6f1c2b8e-7a8e-4a3e-9d7c-6a0c1f7b2d11}")),
            1 => Just(json!("urn:uuid:6f1c2b8e-7a8e-4a3e-9d7c-6a0c1f7b2d11")),
            1 => Just(json!(" 6f1c2b8e-7a8e-4a3e-9d7c-6a0c1f7b2d11")),
            1 => "[0-9a-fA-F-]{30,40}".prop_map(Value::from),
        ];
        let action = prop_oneof![
            3 => Just(json!("accepted")),
            2 => Just(json!("rejected")),
            1 => Just(json!("Accepted")),
            1 => "[a-z]{0,9}".prop_map(Value::from),
        ];
        let other = prop_oneof![
            Just(Value::Null),
            any::<i64>().prop_map(Value::from),
            any::<bool>().prop_map(Value::from),
            ".{0,20}".prop_map(Value::from),
            Just(json!([])),
            Just(json!({"action": "accepted"})),
        ];
        let field = |right: BoxedStrategy<Value>, other: BoxedStrategy<Value>| prop_oneof![6 => right.prop_map(Some), 1 => other.prop_map(Some), 1 => Just(None)];
        let object = (
            field(trip_id.boxed(), other.clone().boxed()),
            field(action.boxed(), other.clone().boxed()),
            prop::collection::vec(("[a-z_]{0,16}", other), 0..3),
        )
            .prop_map(|(trip_id, action, extra)| {
                let mut object: serde_json::Map<String, Value> = extra.into_iter().collect();
                if let Some(v) = trip_id {
                    object.insert("trip_request_id".into(), v);
                }
                if let Some(v) = action {
                    object.insert("action".into(), v);
                }
                serde_json::to_vec(&object).unwrap_or_default()
            });
        prop_oneof![1 => prop::collection::vec(any::<u8>(), 0..200), 3 => object]
    }

    #[test]
    fn otp_is_four_digits() {
        for _ in 0..100 {
            let otp = new_otp();
            assert!(otp.len() == 4 && otp.chars().all(|c| c.is_ascii_digit()), "{otp}");
        }
    }
}
