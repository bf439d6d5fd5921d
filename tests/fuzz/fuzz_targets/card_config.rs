//! See xen_vsnd::fuzzing::card_config.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xen_vsnd::fuzzing::card_config(data));
