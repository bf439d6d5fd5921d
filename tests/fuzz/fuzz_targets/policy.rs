//! See xen_vsnd::fuzzing::policy.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xen_vsnd::fuzzing::policy(data));
