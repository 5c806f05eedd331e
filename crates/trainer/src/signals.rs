//! SIGTERM and SIGINT during training: finish the step, save, exit 0.
//!
//! Slurm sends SIGTERM before a time limit or a preemption (`#SBATCH --signal=TERM@120` sends it
//! 120 s early), and Ctrl-C sends SIGINT. Ended at once, a week-long run would lose everything
//! since its last periodic checkpoint; torchtitan and Lightning save on that signal, and so do we:
//! [`install`] (every training binary's `main`, through `distributed::main_with`) only records
//! the signal; the loops ask [`received`] between steps (the trainer's loop, PPO's iterations,
//! rejection sampling's rounds), write a checkpoint of the last completed step, and end with
//! [`Interrupted`], which `main` turns into a line and exit status 0. In an MPI job the ranks
//! agree (any rank signalled: all stop at the same step). A second signal ends the process at
//! once, as the signal's default action would.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use signal_hook::consts::{SIGINT, SIGTERM};

struct Received {
    any: Arc<AtomicBool>,
    which: Arc<AtomicUsize>,
}

static RECEIVED: OnceLock<Received> = OnceLock::new();

/// Records SIGTERM and SIGINT from now on instead of dying of the first; a second one of either
/// ends the process (their default action). Idempotent.
pub fn install() -> anyhow::Result<()> {
    if RECEIVED.get().is_some() {
        return Ok(());
    }
    let received = Received { any: Arc::new(AtomicBool::new(false)), which: Arc::new(AtomicUsize::new(0)) };
    for signal in [SIGTERM, SIGINT] {
        // Registered first, so it sees the flag as it was before this signal: set means second.
        signal_hook::flag::register_conditional_default(signal, Arc::clone(&received.any))?;
        signal_hook::flag::register_usize(signal, Arc::clone(&received.which), signal as usize)?;
        signal_hook::flag::register(signal, Arc::clone(&received.any))?;
    }
    let _ = RECEIVED.set(received);
    Ok(())
}

/// The name of the signal received, if one was (on this process).
pub fn received() -> Option<&'static str> {
    let r = RECEIVED.get()?;
    if !r.any.load(Ordering::SeqCst) {
        return None;
    }
    Some(match r.which.load(Ordering::SeqCst) as i32 {
        SIGINT => "SIGINT",
        _ => "SIGTERM",
    })
}

/// The end of a run stopped by a signal after saving: not a failure (`main` exits 0 with
/// [`Interrupted`]'s line).
#[derive(Debug)]
pub struct Interrupted {
    pub signal: &'static str,
    /// What the loop counts: "step", "iteration" (PPO), "round" (rejection sampling).
    pub unit: &'static str,
    /// The last completed one.
    pub step: u64,
    pub checkpoint: std::path::PathBuf,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} received: stopped after {} {}, checkpoint in {}; continue with --resume", self.signal, self.unit, self.step, self.checkpoint.display())
    }
}

impl std::error::Error for Interrupted {}

/// If `result` is an [`Interrupted`] (however wrapped in context), its line.
pub fn interrupted(result: &anyhow::Result<()>) -> Option<&Interrupted> {
    result.as_ref().err()?.chain().find_map(|e| e.downcast_ref::<Interrupted>())
}
