//! The file I/O every crate of the workspace shares, so that there is one way to do each:
//!
//! - **Atomic writes**: a file or a directory is written under a temporary sibling name and
//!   renamed into place, so a reader (or a run killed mid-write) sees the old one or the whole
//!   new one, never a part.
//! - **JSONL**: every non-empty line parsed as JSON, streamed, each error naming `file:line`.
//!
//! Errors are `std::io::Error`s whose message names the path (and line), ready to print.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

fn named(path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// `DIR/.NAME.tmp-PID`: where `DIR/NAME` is written before the rename that publishes it (hidden,
/// and per process, so two writers never share one).
pub fn tmp_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `bytes` to `path` through a temporary sibling and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// [`write_atomic`] for a file too large to build in memory first: `fill` streams it into a
/// buffered writer on the temporary sibling, which is flushed and renamed once `fill` is done.
/// If `fill` fails, the temporary file is removed and `path` is left as it was.
pub fn write_atomic_with(path: &Path, fill: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>) -> std::io::Result<()> {
    let tmp = tmp_sibling(path);
    // Errors name the file asked for (the temporary one is ours, not the user's).
    let written = File::create(&tmp).and_then(|f| {
        let mut w = BufWriter::new(f);
        fill(&mut w)?;
        w.flush()
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(named(path, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        named(path, e)
    })
}

/// Writes the directory `dest` through a fresh temporary sibling that `fill` populates, then
/// replaces `dest` (removed first if it exists) by a rename. If `fill` fails, the temporary
/// directory is removed and `dest` is left as it was.
pub fn write_dir_atomic<E: From<std::io::Error>>(dest: &Path, fill: impl FnOnce(&Path) -> Result<(), E>) -> Result<(), E> {
    let tmp = tmp_sibling(dest);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| named(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| named(dest, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dest.exists() {
        std::fs::remove_dir_all(dest).map_err(|e| named(dest, e))?;
    }
    std::fs::rename(&tmp, dest).map_err(|e| named(dest, e))?;
    Ok(())
}

/// `text` without a leading UTF-8 byte-order mark (U+FEFF), which editors on Windows write at
/// the start of text files: every text input (JSONL, TOML, text corpora) is read through it.
pub fn without_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// One non-empty line of a JSONL file.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonLine {
    /// `file:line`, for messages.
    pub at: String,
    /// The line number, from 1.
    pub line: usize,
    pub value: serde_json::Value,
}

/// The non-empty lines of a JSONL file as JSON, in order and streamed. Opening the file, a line
/// that is not UTF-8, and a line that is not JSON are errors naming the file (and line).
pub fn read_jsonl(path: &Path) -> std::io::Result<impl Iterator<Item = std::io::Result<JsonLine>>> {
    let reader = BufReader::new(File::open(path).map_err(|e| named(path, e))?);
    let path = path.to_path_buf();
    Ok(reader.lines().enumerate().filter_map(move |(n, line)| {
        let at = format!("{}:{}", path.display(), n + 1);
        let line = match line {
            Ok(l) if l.trim().is_empty() => return None,
            Ok(l) if n == 0 => without_bom(&l).to_string(),
            Ok(l) => l,
            Err(e) => return Some(Err(std::io::Error::new(e.kind(), format!("{at}: {e}")))),
        };
        Some(match serde_json::from_str(&line) {
            Ok(value) => Ok(JsonLine { at, line: n + 1, value }),
            Err(e) => Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{at}: invalid JSON: {e}"))),
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_lines_name_their_file_and_line() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("x.jsonl");
        std::fs::write(&path, b"{\"a\": 1}\n\n  \n{\"a\": 2}\n{\"a\": broken\n\xff\n").unwrap();
        let got: Vec<_> = read_jsonl(&path).unwrap().collect();
        assert_eq!(got.len(), 4);
        let ok: Vec<(usize, i64)> = got[..2].iter().map(|l| l.as_ref().map(|l| (l.line, l.value["a"].as_i64().unwrap())).unwrap()).collect();
        assert_eq!(ok, vec![(1, 1), (4, 2)]);
        let err = got[2].as_ref().unwrap_err().to_string();
        assert!(err.contains("x.jsonl:5: invalid JSON"), "{err}");
        assert!(got[3].as_ref().unwrap_err().to_string().contains("x.jsonl:6"));
        assert!(read_jsonl(&tmp.path().join("none.jsonl")).err().unwrap().to_string().contains("none.jsonl"));
        // A byte-order mark before the first line is not part of the JSON.
        std::fs::write(&path, "\u{feff}{\"a\": 3}\n").unwrap();
        assert_eq!(read_jsonl(&path).unwrap().next().unwrap().unwrap().value["a"], 3);
    }

    #[test]
    fn atomic_writes_publish_whole_files_and_directories_or_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f.txt");
        write_atomic(&file, b"one").unwrap();
        write_atomic(&file, b"two").unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "two");
        let dir = tmp.path().join("d");
        write_dir_atomic::<std::io::Error>(&dir, |t| std::fs::write(t.join("a"), "1")).unwrap();
        // A failed fill leaves the old directory and no temporary one.
        let err = write_dir_atomic::<std::io::Error>(&dir, |t| {
            std::fs::write(t.join("a"), "half")?;
            Err(std::io::Error::other("killed"))
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "1");
        write_dir_atomic::<std::io::Error>(&dir, |t| std::fs::write(t.join("b"), "2")).unwrap();
        let names: Vec<String> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(
            {
                let mut n = names;
                n.sort();
                n
            },
            vec!["d".to_string(), "f.txt".to_string()]
        );
        assert!(dir.join("b").exists() && !dir.join("a").exists());
    }
}
