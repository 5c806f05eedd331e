//! Where numbers go: TensorBoard event files, `metrics.jsonl` (one JSON object per logged step,
//! for pandas and for tests), and the terminal (a progress bar on a TTY, plain lines otherwise).

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};

use crate::tensorboard::EventWriter;

/// The writers; absent on the ranks other than 0 of an MPI job (rank 0 logs for the job).
pub struct Metrics {
    writers: Option<(EventWriter, File)>,
    bar: Option<ProgressBar>,
}

impl Metrics {
    /// Opens the writers under `out_dir` (`tensorboard/` and `metrics.jsonl`, appended to on
    /// resume); a progress bar of `total_steps` starting at `start_step` when stderr is a TTY.
    ///
    /// A run (re)starting at `start_step` redoes every step after it: what an earlier process
    /// logged for those steps is dropped from `metrics.jsonl` (rewritten atomically) and marked
    /// for TensorBoard to discard, so each step is shown once.
    pub fn open(out_dir: &Path, total_steps: u64, start_step: u64) -> anyhow::Result<Self> {
        Self::open_keeping(out_dir, total_steps, start_step, None)
    }

    /// [`Self::open`] for a log whose rows are not in step order (rejection sampling logs each
    /// round's best-of-k curve by k): `metrics.jsonl` keeps its first `rows` rows, what the
    /// interrupted process logged after them goes.
    pub fn open_after_rows(out_dir: &Path, total_steps: u64, start_step: u64, rows: usize) -> anyhow::Result<Self> {
        Self::open_keeping(out_dir, total_steps, start_step, Some(rows))
    }

    fn open_keeping(out_dir: &Path, total_steps: u64, start_step: u64, rows: Option<usize>) -> anyhow::Result<Self> {
        if !crate::distributed::world().is_root() {
            return Ok(Self { writers: None, bar: None });
        }
        let mut tb = EventWriter::create(&out_dir.join("tensorboard")).map_err(|e| anyhow::anyhow!("{}: {e}", out_dir.display()))?;
        // Steps from `redone` on are logged again by this run (at a fresh start, step 0 too).
        let redone = if start_step == 0 { 0 } else { start_step + 1 };
        tb.session_start(redone)?;
        let path = out_dir.join("metrics.jsonl");
        match rows {
            None => drop_rows_from(&path, redone)?,
            Some(rows) => keep_first_rows(&path, rows)?,
        }
        let jsonl = OpenOptions::new().create(true).append(true).open(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total_steps);
            bar.set_style(ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {msg} ETA {eta}").expect("valid template").progress_chars("=> "));
            bar.set_position(start_step);
            bar
        });
        Ok(Self { writers: Some((tb, jsonl)), bar })
    }

    /// Records scalars of one step in TensorBoard and metrics.jsonl.
    pub fn scalars<S: AsRef<str>>(&mut self, step: u64, values: &[(S, f64)]) -> anyhow::Result<()> {
        let Some((tb, jsonl)) = &mut self.writers else { return Ok(()) };
        let mut line = serde_json::Map::new();
        line.insert("step".into(), step.into());
        for (tag, v) in values {
            let tag = tag.as_ref();
            tb.scalar(tag, step, *v)?;
            line.insert(tag.into(), serde_json::Number::from_f64(*v).map_or(serde_json::Value::Null, Into::into));
        }
        // One write of the whole row: `writeln!` formats in pieces, a write each, and a kill -9
        // between two of them left half a row for the resumed run to append to.
        let mut row = serde_json::Value::Object(line).to_string();
        row.push('\n');
        jsonl.write_all(row.as_bytes())?;
        tb.flush()?;
        Ok(())
    }

    pub fn text(&mut self, step: u64, tag: &str, text: &str) -> anyhow::Result<()> {
        let Some((tb, _)) = &mut self.writers else { return Ok(()) };
        tb.text(tag, step, text)?;
        tb.flush()?;
        Ok(())
    }

    /// Advances the bar, or prints a plain line when not on a terminal.
    pub fn progress(&self, step: u64, total: u64, summary: &str) {
        if self.writers.is_none() {
            return;
        }
        match &self.bar {
            Some(bar) => {
                bar.set_position(step);
                bar.set_message(summary.to_string());
            }
            None => println!("step {step}/{total} {summary}"),
        }
    }

    /// Prints a message without breaking the bar.
    pub fn println(&self, msg: &str) {
        if self.writers.is_none() {
            return;
        }
        match &self.bar {
            Some(bar) => bar.println(msg),
            None => println!("{msg}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Rewrites `path` (JSON lines with a `step`) without the rows of step `from` or later, and
/// without lines that are not JSON (a row torn by a kill); JSON lines without a step are kept.
fn drop_rows_from(path: &Path, from: u64) -> anyhow::Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let keep = |line: &str| match serde_json::from_str::<serde_json::Value>(line) {
        Ok(row) => row.get("step").and_then(|s| s.as_u64()).is_none_or(|s| s < from),
        // A row torn by a kill mid-write (a file written before rows went out in one write).
        Err(_) => false,
    };
    let kept: Vec<&str> = text.lines().filter(|l| keep(l)).collect();
    if kept.len() == text.lines().count() {
        return Ok(());
    }
    let body: String = kept.iter().map(|l| format!("{l}\n")).collect();
    Ok(llama_io::write_atomic(path, body.as_bytes())?)
}

/// Rewrites `path` with its first `rows` lines only.
fn keep_first_rows(path: &Path, rows: usize) -> anyhow::Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    if text.lines().count() <= rows {
        return Ok(());
    }
    let body: String = text.lines().take(rows).map(|l| format!("{l}\n")).collect();
    Ok(llama_io::write_atomic(path, body.as_bytes())?)
}

/// The rows `metrics.jsonl` under `out_dir` holds now (0 when there is none).
pub fn rows_logged(out_dir: &Path) -> usize {
    std::fs::read_to_string(out_dir.join("metrics.jsonl")).map_or(0, |t| t.lines().count())
}

pub use llama_model::host_memory::peak_rss_bytes;

#[cfg(test)]
mod tests {
    use super::*;

    /// A resumed run drops what the interrupted one logged after its checkpoint, a torn last row
    /// included, and appends whole rows after it: every row of the file parses.
    #[test]
    fn a_resume_drops_later_and_torn_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(&path, "{\"step\":1,\"train/loss\":3.0}\n{\"step\":2,\"train/loss\":2.5}\n{\"step\":3,\"train/loss\":2.0}\n{\"step\":4,\"tra").unwrap();
        let mut metrics = Metrics::open(dir.path(), 10, 2).unwrap();
        metrics.scalars(3, &[("train/loss", 2.1)]).unwrap();
        drop(metrics);
        let text = std::fs::read_to_string(&path).unwrap();
        let steps: Vec<u64> = text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, [1, 2, 3], "{text}");
        assert!(text.contains("2.1") && !text.contains("2.0}"), "{text}");
    }
}
