//! Kernel choices an environment variable can force (`LLAMA32_W4A16_KERNEL`, `LLAMA32_PREFILL_KERNEL`): `auto`
//! (the default: the caller picks) or one kernel's name, read once per process.

use std::sync::OnceLock;

use crate::{Error, Result};

/// A set of interchangeable kernels, one of which [`ENV`](Self::ENV) may force.
pub trait KernelSwitch: Copy + PartialEq + 'static {
    /// The environment variable.
    const ENV: &'static str;
    /// What is chosen, for errors ("prefill kernel").
    const WHAT: &'static str;
    /// Every kernel, in the order an error lists them.
    const KERNELS: &'static [Self];

    /// The kernel's name, as the variable spells it.
    fn name(self) -> &'static str;

    /// The cell that keeps the variable's value once read (one per implementation).
    fn env_cell() -> &'static OnceLock<Option<String>>;

    /// A kernel's name (a forced kernel), or `auto` (`None`); surrounding white space is ignored. Anything else is
    /// an error that names the variable and the values it takes.
    fn parse(s: &str) -> Result<Option<Self>> {
        let s = s.trim();
        if s == "auto" {
            return Ok(None);
        }
        if let Some(&k) = Self::KERNELS.iter().find(|k| k.name() == s) {
            return Ok(Some(k));
        }
        let names: Vec<String> =
            std::iter::once("auto").chain(Self::KERNELS.iter().map(|k| k.name())).map(|n| format!("`{n}`")).collect();
        let expected = match names.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
            _ => names.join(""),
        };
        Err(Error::Request(format!("{}: unknown {} {s:?} (expected {expected})", Self::ENV, Self::WHAT)))
    }

    /// The kernel [`ENV`](Self::ENV) forces (read once per process), or `None` when it is unset, empty or `auto`.
    fn forced() -> Result<Option<Self>> {
        match Self::env_cell().get_or_init(|| std::env::var(Self::ENV).ok().filter(|v| !v.trim().is_empty())) {
            Some(v) => Self::parse(v),
            None => Ok(None),
        }
    }

    /// The setting's name for reports: `auto` or the forced kernel's name.
    fn setting() -> Result<&'static str> {
        Ok(Self::forced()?.map_or("auto", Self::name))
    }
}
