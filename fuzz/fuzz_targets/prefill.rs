#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vlm_budget_fuzz::checks::prefill(data));
