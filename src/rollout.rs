//! The rollout router: puts each driver's accept command in a cohort and runs it on that
//! cohort's implementation.
//!
//! [`RolloutRouter`] is an ordinary `tower::Service` holding both inner services (the
//! linkerd `distribute` pattern). Per command it reads the flags in force (lock-free),
//! buckets the command's driver — the verified token's subject, never the body — and calls
//! the chosen service. The answer comes back [`Routed`]: with the cohort that produced it,
//! success or refusal, for the response header, the metrics and the log line.
//!
//! Only a parsed command with a verified token reaches the router: a request that fails
//! the token check or validation never gets a cohort (`cohort="none"`). Whether the
//! token's driver is (still) an active driver may be settled inside the cohort's service
//! (`AcceptCommand::driver_checked`); a driver refused there is answered without a cohort
//! too (`http/driver.rs`).

use std::task::{Context, Poll};

use futures_util::future::{Either, FutureExt, Map};
use tower::Service;

use crate::accept::AcceptCommand;
use crate::domain::Cohort;
use crate::flags::FlagsHandle;

/// An answer with the cohort that produced it.
#[derive(Debug, Clone, PartialEq)]
pub struct Routed<T> {
    /// The cohort the router chose.
    pub cohort: Cohort,
    /// What that cohort's service answered.
    pub result: T,
}

/// Routes each command to `legacy` or `atomic` by the driver's cohort.
#[derive(Clone)]
pub struct RolloutRouter<L, A> {
    flags: FlagsHandle,
    legacy: L,
    atomic: A,
}

impl<L, A> RolloutRouter<L, A> {
    /// A router over the two implementations, reading `flags` per command.
    pub fn new(flags: FlagsHandle, legacy: L, atomic: A) -> Self {
        Self { flags, legacy, atomic }
    }
}

type Tag<R, E> = fn(Result<R, E>) -> Result<Routed<Result<R, E>>, E>;

impl<L, A> Service<AcceptCommand> for RolloutRouter<L, A>
where
    L: Service<AcceptCommand>,
    A: Service<AcceptCommand, Response = L::Response, Error = L::Error>,
{
    type Response = Routed<Result<L::Response, L::Error>>;
    /// Only readiness fails here; a routed call's own error is in [`Routed::result`].
    type Error = L::Error;
    type Future = Either<Map<L::Future, Tag<L::Response, L::Error>>, Map<A::Future, Tag<L::Response, L::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Both must be ready: the cohort is only known once the command is seen.
        match (self.legacy.poll_ready(cx)?, self.atomic.poll_ready(cx)?) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    }

    fn call(&mut self, cmd: AcceptCommand) -> Self::Future {
        match self.flags.load().trip_accept_cohort(&cmd.driver_id) {
            Cohort::Legacy => Either::Left(self.legacy.call(cmd).map(routed_legacy as Tag<_, _>)),
            Cohort::AtomicAsync => Either::Right(self.atomic.call(cmd).map(routed_atomic as Tag<_, _>)),
        }
    }
}

fn routed_legacy<R, E>(result: Result<R, E>) -> Result<Routed<Result<R, E>>, E> {
    Ok(Routed {
        cohort: Cohort::Legacy,
        result,
    })
}

fn routed_atomic<R, E>(result: Result<R, E>) -> Result<Routed<Result<R, E>>, E> {
    Ok(Routed {
        cohort: Cohort::AtomicAsync,
        result,
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use tower::ServiceExt;
    use tower_test::{assert_request_eq, mock};

    use super::*;
    use crate::domain::TripAction;
    use crate::flags::FlagSet;

    fn flags(percent: f64, allow: &[&str]) -> FlagsHandle {
        let allow: Vec<String> = allow.iter().map(|d| format!("{d:?}")).collect();
        let text = format!(
            "[trip_accept_v2]\npercent = {percent}\nallow = [{}]\n",
            allow.join(", ")
        );
        FlagsHandle::new(FlagSet::parse(&text).unwrap(), PathBuf::from("rollout.toml"))
    }

    fn command(driver: &str) -> AcceptCommand {
        AcceptCommand {
            driver_id: driver.into(),
            trip_id: "6f1c2b8e-7a8e-4a3e-9d7c-6a0c1f7b2d11".into(),
            action: TripAction::Accepted,
            received_at_ms: 1,
            driver_checked: true,
        }
    }

    type Mock = mock::Mock<AcceptCommand, &'static str>;
    type Handle = mock::Handle<AcceptCommand, &'static str>;

    fn router(flags: FlagsHandle) -> (RolloutRouter<Mock, Mock>, Handle, Handle) {
        let (legacy, legacy_handle) = mock::pair();
        let (atomic, atomic_handle) = mock::pair();
        (RolloutRouter::new(flags, legacy, atomic), legacy_handle, atomic_handle)
    }

    #[tokio::test]
    async fn sends_each_command_to_its_cohort_and_tags_the_answer() {
        let (router, mut legacy, mut atomic) = router(flags(0.0, &["d-allowed"]));
        let call = tokio::spawn(router.clone().oneshot(command("d-allowed")));
        assert_request_eq!(atomic, command("d-allowed")).send_response("atomic");
        let routed = call.await.unwrap().unwrap();
        assert_eq!(routed.cohort, Cohort::AtomicAsync);
        assert_eq!(routed.result.unwrap(), "atomic");

        let call = tokio::spawn(router.oneshot(command("d-other")));
        assert_request_eq!(legacy, command("d-other")).send_response("legacy");
        let routed = call.await.unwrap().unwrap();
        assert_eq!((routed.cohort, routed.result.unwrap()), (Cohort::Legacy, "legacy"));
    }

    #[tokio::test]
    async fn a_refusal_keeps_its_cohort() {
        let (router, _legacy, mut atomic) = router(flags(100.0, &[]));
        let call = tokio::spawn(router.oneshot(command("d1")));
        let (_, respond) = atomic.next_request().await.unwrap();
        respond.send_error(std::io::Error::other("trip taken"));
        let routed = call.await.unwrap().unwrap();
        assert_eq!(routed.cohort, Cohort::AtomicAsync);
        assert_eq!(routed.result.unwrap_err().to_string(), "trip taken");
    }

    #[tokio::test]
    async fn reads_the_flags_per_command() {
        let handle = flags(0.0, &[]);
        let (mut router, mut legacy, mut atomic) = router(handle.clone());
        let call = tokio::spawn(router.clone().oneshot(command("d1")));
        legacy.next_request().await.unwrap().1.send_response("legacy");
        assert_eq!(call.await.unwrap().unwrap().cohort, Cohort::Legacy);
        // 100 %: the next command of the same driver goes to atomic_async, no new router.
        handle.replace(flags(100.0, &[]).snapshot().set.clone());
        let call = tokio::spawn(async move { router.ready().await?.call(command("d1")).await });
        atomic.next_request().await.unwrap().1.send_response("atomic");
        assert_eq!(call.await.unwrap().unwrap().cohort, Cohort::AtomicAsync);
    }

    #[tokio::test]
    async fn ready_only_when_both_cohorts_are() {
        let (mut router, mut legacy, mut atomic) = router(flags(50.0, &[]));
        legacy.allow(1);
        atomic.allow(0);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(router.poll_ready(&mut cx).is_pending(), "atomic_async not ready");
        atomic.allow(1);
        assert!(router.poll_ready(&mut cx).is_ready());
    }
}
