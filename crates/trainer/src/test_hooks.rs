//! Test hooks: environment variables that make a training process fail or die at a named point,
//! for the crash and failure tests. Unset (always, outside tests) each costs one lookup.
//!
//! A spec is `POINT@STEP` (at that step only) or `POINT` (at every step).

/// `POINT@STEP` kills this process with SIGKILL at that point, as `kill -9` or a lost node would.
/// Points: `backward` (the step's backward passes done, before the gradients are reduced and the
/// update), `update` (after the optimizer update, before anything is logged), `logged` (after the
/// step's metrics are written), and inside the checkpoint of that step: `model.bpk`,
/// `optimizer.bpk`, `state.json` (after writing that file), `synced` (every file fsynced, before
/// the publishing rename), `published` (renamed into place, before pruning), `pruning` (an old
/// checkpoint renamed out of the listed names, before its deletion).
pub const KILL_AT_ENV: &str = "LLAMA2_TEST_KILL_AT";

/// With [`KILL_AT_ENV`] or [`SIGNAL_AT_ENV`]: only the rank of this number dies or is signalled
/// (a rank lost mid-job, a signal that reaches one rank first); unset, every rank that reaches
/// the point does.
pub const KILL_RANK_ENV: &str = "LLAMA2_TEST_KILL_RANK";

/// `FILE@STEP` makes the checkpoint writer fail (an error, not a kill) right after writing FILE,
/// as a full disk would.
pub const FAIL_AFTER_ENV: &str = "LLAMA2_TEST_FAIL_CHECKPOINT_AFTER";

/// `POINT@STEP[,POINT@STEP...]` sends this process SIGTERM at each of those points (as Slurm
/// does before a time limit); `SIGINT:POINT@STEP` sends SIGINT (Ctrl-C).
pub const SIGNAL_AT_ENV: &str = "LLAMA2_TEST_SIGNAL_AT";

/// Whether the spec in `var` (specs separated by commas) names `point` at `step`.
pub fn names(var: &str, point: &str, step: u64) -> bool {
    let Ok(specs) = std::env::var(var) else { return false };
    specs.split(',').any(|spec| {
        let spec = spec.strip_prefix("SIGINT:").unwrap_or(spec);
        match spec.split_once('@') {
            Some((p, at)) => p == point && at.parse::<u64>().ok() == Some(step),
            None => spec == point,
        }
    })
}

/// Sends the signal [`SIGNAL_AT_ENV`] names at `point` and `step`, and waits until the handler
/// has seen it (a signal is delivered to some thread, soon but not at once).
fn signal_point(point: &str, step: u64) {
    if !names(SIGNAL_AT_ENV, point, step) || !this_rank_is_named() {
        return;
    }
    let int =
        std::env::var(SIGNAL_AT_ENV).is_ok_and(|s| s.split(',').any(|spec| spec.strip_prefix("SIGINT:").is_some_and(|rest| rest == format!("{point}@{step}"))));
    let before = crate::signals::received().is_some();
    // SAFETY: kill(2) on this process, with a signal its handlers record.
    unsafe {
        libc::kill(libc::getpid(), if int { libc::SIGINT } else { libc::SIGTERM });
    }
    // A first signal is recorded; a second ends the process before this returns.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !before && crate::signals::received().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    if before {
        std::thread::sleep(std::time::Duration::from_secs(5));
    }
}

/// Whether [`KILL_RANK_ENV`] is unset or names this rank.
fn this_rank_is_named() -> bool {
    std::env::var(KILL_RANK_ENV).map_or(true, |rank| rank.parse::<usize>().ok() == Some(crate::distributed::world().rank()))
}

/// Dies here with SIGKILL when [`KILL_AT_ENV`] names `point` at `step` (and, with
/// [`KILL_RANK_ENV`], this is that rank); sends a signal when [`SIGNAL_AT_ENV`] names it.
pub fn kill_point(point: &str, step: u64) {
    signal_point(point, step);
    if !names(KILL_AT_ENV, point, step) || !this_rank_is_named() {
        return;
    }
    // SAFETY: kill(2) on this process; nothing is left to run after it.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::names;

    #[test]
    fn specs_name_a_point_at_one_step_or_every_step() {
        // SAFETY: this test alone uses this variable.
        unsafe { std::env::set_var("LLAMA2_TEST_HOOK_SPEC", "state.json@4") };
        assert!(names("LLAMA2_TEST_HOOK_SPEC", "state.json", 4));
        assert!(!names("LLAMA2_TEST_HOOK_SPEC", "state.json", 40));
        assert!(!names("LLAMA2_TEST_HOOK_SPEC", "model.bpk", 4));
        unsafe { std::env::set_var("LLAMA2_TEST_HOOK_SPEC", "update") };
        assert!(names("LLAMA2_TEST_HOOK_SPEC", "update", 7));
        assert!(!names("LLAMA2_TEST_HOOK_UNSET", "update", 7));
    }
}
