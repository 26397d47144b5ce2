//! The official OpenAI Python client against `llama32 serve` (`scripts/openai_client_check.py`): every answer must
//! parse into the client's models and keep OpenAI's documented promises. Runs when `LLAMA32_OPENAI_PYTHON` names a
//! Python that has the `openai` package (`.ci/run` installs a pinned one) and the reference data is there.

mod common;

use std::path::Path;
use std::process::Command;

#[test]
fn the_official_openai_client_parses_every_answer() {
    let Some(python) = std::env::var_os("LLAMA32_OPENAI_PYTHON").filter(|p| !p.is_empty()) else {
        eprintln!("skipped: LLAMA32_OPENAI_PYTHON is not set (a Python with the openai package)");
        return;
    };
    let Some(data) = common::data_dir() else { return };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/openai_client_check.py");
    let out = Command::new(&python)
        .arg(&script)
        .args(["--bin", env!("CARGO_BIN_EXE_llama32"), "--data"])
        .arg(&data)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", Path::new(&python).display()));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{stdout}");
    assert!(out.status.success(), "the OpenAI client checks failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("0 check(s) failed"), "{stdout}");
}
