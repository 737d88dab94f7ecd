//! The domain: plain types every layer names — the cohort, the flag, the trip's action,
//! type and status, the driver's availability, the job's state and kind, the side effects,
//! a point on the map — and the one clock. No I/O, no imports from the rest of the crate.
//!
//! Each enum that is stored or labelled has `as_str` (the column / label value) and
//! `parse` (its inverse, `None` for anything else), so code decides on types and only the
//! edges (SQL, JSON, metrics) see strings.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Milliseconds since the Unix epoch: every time column, every timestamp tripgate keeps.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// The shard (of `shards`) that holds the row with id `id` — a driver, a customer, a trip
/// and everything of that trip. A stable hash of the id (FNV-1a), so every gateway and
/// every tool computes the same shard from the id alone: the id carries its shard. A region
/// keeps its drivers and its trips on one shard by taking ids that hash there (see
/// `Storage::new_id`). One shard: always 0.
pub fn shard_of(id: &str, shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % shards as u64) as usize
}

/// The flag that routes trip acceptance.
pub const TRIP_ACCEPT_FLAG: &str = "trip_accept_v2";

/// Declares a closed set of string values: the enum, `ALL`, `as_str` and `parse`.
macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $value:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: [$name; [$($value,)+].len()] = [$($name::$variant,)+];

            /// The column / label value.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $value,)+
                }
            }

            /// The value named `s`.
            pub fn parse(s: &str) -> Option<$name> {
                match s {
                    $($value => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum! {
    /// Which implementation serves a request.
    Cohort {
        /// The synchronous handler of today.
        Legacy = "legacy",
        /// The atomic claim + durable job.
        AtomicAsync = "atomic_async",
    }
}

string_enum! {
    /// What the driver asks for.
    TripAction {
        /// Take the trip.
        Accepted = "accepted",
        /// Decline the offer.
        Rejected = "rejected",
    }
}

string_enum! {
    /// A trip's type: decides its side effects.
    TripType {
        /// A passenger ride: OTP push and SMS to the customer.
        Ride = "ride_request",
        /// A parcel: SMS to the receiver.
        Parcel = "parcel",
    }
}

string_enum! {
    /// Where a trip is in its life (`trip_requests.current_status`).
    TripStatus {
        /// Offered, no driver yet: the only status an accept can take.
        Pending = "pending",
        /// A driver has it.
        Accepted = "accepted",
        /// Under way.
        Ongoing = "ongoing",
        /// Finished.
        Completed = "completed",
        /// Cancelled by the customer.
        Cancelled = "cancelled",
    }
}

string_enum! {
    /// A driver's availability (`driver_details.availability_status`).
    Availability {
        /// Free for a trip.
        Available = "available",
        /// Bidding on a fare: may still take a trip.
        OnBidding = "on_bidding",
        /// Holds a trip.
        OnTrip = "on_trip",
        /// Not taking trips.
        Unavailable = "unavailable",
    }
}

impl Availability {
    /// May take a trip in this state (when also online).
    pub fn can_take_trip(self) -> bool {
        matches!(self, Self::Available | Self::OnBidding)
    }
}

string_enum! {
    /// A job's state in the queue.
    JobState {
        /// Waiting for its `run_at`.
        Queued = "queued",
        /// Claimed by a worker (or a legacy request) under a lease.
        Running = "running",
        /// Every effect recorded.
        Done = "done",
        /// Gave up after `jobs.max_attempts`; retryable by hand.
        Dead = "dead",
    }
}

string_enum! {
    /// What a job runs.
    JobKind {
        /// The side effects of an accepted trip.
        TripAccepted = "trip_accepted",
    }
}

string_enum! {
    /// What a provider call of an effect is, given its record (the metrics' `result`).
    Call {
        /// The effect's first call.
        First = "first",
        /// A call again after a recorded failure.
        Retry = "retry",
        /// A call again while an earlier call's outcome is unknown (its process died or
        /// stalled between the call and its record): possibly a duplicate, sent with the
        /// same idempotency key.
        Repeat = "repeat",
    }
}

string_enum! {
    /// The state of one side effect's record.
    EffectState {
        /// Not yet handed to its provider (or the handing-over was not recorded).
        Pending = "pending",
        /// Done: never run again.
        Done = "done",
        /// The last call failed; the job retries it.
        Failed = "failed",
    }
}

string_enum! {
    /// One side effect of an accept, in the legacy handler's order.
    Effect {
        /// Bidding bookkeeping: settle the fare, ignore the other bids.
        Bidding = "bidding",
        /// SMS to a parcel's receiver.
        ParcelSms = "parcel_sms",
        /// Delete the trip's rejected-driver requests.
        CleanupRejected = "cleanup_rejected",
        /// OTP push to the customer.
        OtpPush = "otp_push",
        /// OTP SMS to the customer.
        OtpSms = "otp_sms",
        /// Driver arrival estimate, pushed to the customer.
        ArrivalPush = "arrival_push",
        /// "Trip taken" push to the other drivers who were offered the trip.
        TripTakenPush = "trip_taken_push",
        /// `trip.accepted` on the event bus.
        TripAcceptedEvent = "trip_accepted_event",
    }
}

impl Effect {
    /// The effects a customer or receiver is waiting for — the OTP and the parcel code —
    /// which go before everything else in the job queue.
    pub fn is_urgent(self) -> bool {
        matches!(self, Self::OtpSms | Self::OtpPush | Self::ParcelSms)
    }

    /// The effects an accepted trip of this type has, in the legacy order.
    pub fn for_trip(trip_type: TripType) -> impl Iterator<Item = Effect> {
        Self::ALL.into_iter().filter(move |e| match e {
            Self::ParcelSms => trip_type == TripType::Parcel,
            Self::OtpPush | Self::OtpSms => trip_type == TripType::Ride,
            _ => true,
        })
    }
}

/// A point.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatLng {
    /// Latitude in degrees.
    pub lat: f64,
    /// Longitude in degrees.
    pub lng: f64,
}

/// A parcel's receiver.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Receiver {
    /// Name.
    pub name: String,
    /// Phone number the parcel SMS goes to.
    pub phone: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_values_round_trip() {
        fn check<T: Copy + PartialEq + std::fmt::Debug>(
            all: &[T],
            as_str: fn(T) -> &'static str,
            parse: fn(&str) -> Option<T>,
        ) {
            for v in all {
                assert_eq!(parse(as_str(*v)), Some(*v));
            }
            assert_eq!(parse("nonsense"), None);
        }
        check(&Cohort::ALL, Cohort::as_str, Cohort::parse);
        check(&TripAction::ALL, TripAction::as_str, TripAction::parse);
        check(&TripType::ALL, TripType::as_str, TripType::parse);
        check(&TripStatus::ALL, TripStatus::as_str, TripStatus::parse);
        check(&Availability::ALL, Availability::as_str, Availability::parse);
        check(&JobState::ALL, JobState::as_str, JobState::parse);
        check(&JobKind::ALL, JobKind::as_str, JobKind::parse);
        check(&EffectState::ALL, EffectState::as_str, EffectState::parse);
        check(&Effect::ALL, Effect::as_str, Effect::parse);
        assert_eq!(serde_json::to_value(Cohort::AtomicAsync).unwrap(), "atomic_async");
    }

    #[test]
    fn effects_per_trip_type_keep_the_legacy_order() {
        let ride: Vec<_> = Effect::for_trip(TripType::Ride).map(Effect::as_str).collect();
        assert_eq!(
            ride,
            [
                "bidding",
                "cleanup_rejected",
                "otp_push",
                "otp_sms",
                "arrival_push",
                "trip_taken_push",
                "trip_accepted_event"
            ]
        );
        let parcel: Vec<_> = Effect::for_trip(TripType::Parcel).collect();
        assert!(parcel.contains(&Effect::ParcelSms) && !parcel.contains(&Effect::OtpSms));
    }

    #[test]
    fn availability() {
        assert!(Availability::Available.can_take_trip() && Availability::OnBidding.can_take_trip());
        assert!(!Availability::OnTrip.can_take_trip() && !Availability::Unavailable.can_take_trip());
    }
}
