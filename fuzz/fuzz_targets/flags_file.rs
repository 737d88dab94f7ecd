//! The flags file parser on arbitrary input: it validates or refuses, never panics, and
//! whatever it accepts is within the contract (percent 0..=100 in steps of 0.01, the
//! routing flag present).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(set) = tripgate::flags::FlagSet::parse(text) {
        assert!(set.flags.contains_key(tripgate::domain::TRIP_ACCEPT_FLAG));
        for flag in set.flags.values() {
            assert!(flag.threshold <= 10_000);
            let _ = flag.decide("driver");
        }
    }
});
