//! The GPU tests' [`Watchdog`] on the CPU: a stalled test is ended within the limit and names its last step; a
//! test that keeps announcing steps is left alone. Each case runs this binary again on a fixture test (ignored, and
//! inert unless `LLAMA32_WATCHDOG_FIXTURE` names its mode, so the suite's benchmark stage finds nothing to do).

use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::Watchdog;

/// Runs the fixture in `mode` with a 1-second stall limit: (exit code, stderr, wall time).
fn run_fixture(mode: &str) -> (Option<i32>, String, Duration) {
    let exe = std::env::current_exe().expect("this test binary");
    let start = Instant::now();
    let out = Command::new(exe)
        .args(["--exact", "watchdog::watchdog_fixture", "--ignored", "--nocapture", "--test-threads=1"])
        .env("LLAMA32_WATCHDOG_FIXTURE", mode)
        .env("LLAMA32_TEST_STALL_S", "1")
        .output()
        .expect("run the fixture");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned(), start.elapsed())
}

#[test]
fn watchdog_ends_a_stalled_test_and_names_the_step() {
    let (code, stderr, wall) = run_fixture("stall");
    assert_eq!(
        code,
        Some(crate::common::WATCHDOG_EXIT),
        "the stalled fixture must end with the watchdog's status: {stderr}"
    );
    let want = "HANG: watchdog_fixture: no progress for 1 s after `sleeping 30 s`";
    assert!(stderr.contains(want), "expected `{want}` in: {stderr}");
    assert!(wall < Duration::from_secs(20), "ended after {wall:?}, not within the limit");
}

#[test]
fn watchdog_leaves_a_progressing_test_alone() {
    let (code, stderr, wall) = run_fixture("progress");
    assert_eq!(code, Some(0), "the progressing fixture was stopped: {stderr}");
    assert!(!stderr.contains("HANG"), "{stderr}");
    assert!(wall >= Duration::from_millis(2500), "the fixture ran {wall:?}: it did not run its steps");
}

/// The subject of the two tests above; does nothing unless `LLAMA32_WATCHDOG_FIXTURE` is `stall` (one step that
/// outlives the limit) or `progress` (3 s of steps 0.4 s apart, then the guard dropped and 1.5 s more).
#[test]
#[ignore = "a fixture for the watchdog tests; inert without LLAMA32_WATCHDOG_FIXTURE"]
fn watchdog_fixture() {
    match std::env::var("LLAMA32_WATCHDOG_FIXTURE").as_deref() {
        Ok("stall") => {
            let dog = Watchdog::start("watchdog_fixture");
            dog.at("sleeping 30 s");
            std::thread::sleep(Duration::from_secs(30));
        }
        Ok("progress") => {
            let dog = Watchdog::start("watchdog_fixture");
            for i in 0..8 {
                dog.at(format!("step {i}"));
                std::thread::sleep(Duration::from_millis(400));
            }
            drop(dog);
            std::thread::sleep(Duration::from_millis(1500));
        }
        _ => {}
    }
}
