//! Driver request decoding on arbitrary bytes: a valid request or named field errors,
//! never a panic; an accepted request has a canonical UUID.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match tripgate::accept::parse_request(data) {
        Ok((trip_id, _action)) => assert_eq!(uuid::Uuid::parse_str(&trip_id).map(|u| u.to_string()).ok(), Some(trip_id)),
        Err(tripgate::error::ApiError::Invalid(errors)) => assert!(!errors.is_empty()),
        Err(other) => panic!("unexpected error {other:?}"),
    }
});
