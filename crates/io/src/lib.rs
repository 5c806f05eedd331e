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

/// The files of a Hugging Face tokenizer: what a model directory carries so that its tokenizer,
/// special tokens and chat template travel with it.
pub const TOKENIZER_FILES: [&str; 4] = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"];

/// Copies the tokenizer `tokenizer_json` into `dir` as `tokenizer.json`, with the other
/// [`TOKENIZER_FILES`] found beside it, so that `dir` (a checkpoint) is a self-contained model
/// directory.
pub fn copy_tokenizer_files(tokenizer_json: &Path, dir: &Path) -> std::io::Result<()> {
    for name in TOKENIZER_FILES {
        let src = if name == TOKENIZER_FILES[0] { tokenizer_json.to_path_buf() } else { tokenizer_json.with_file_name(name) };
        if name == TOKENIZER_FILES[0] || src.is_file() {
            std::fs::copy(&src, dir.join(name)).map_err(|e| named(&src, e))?;
        }
    }
    Ok(())
}

/// Longest line [`read_jsonl`] accepts, in bytes, unless `LLAMA2_MAX_LINE_BYTES` says otherwise:
/// far above any chat or document of a training set, and low enough that a file without a
/// newline (a binary, `/dev/zero`) is refused instead of read into one string until memory ends.
pub const MAX_LINE_BYTES: usize = 4 << 20;

/// The line-length cap of [`read_jsonl`]: `LLAMA2_MAX_LINE_BYTES` if set (a number of bytes),
/// else [`MAX_LINE_BYTES`].
pub fn max_line_bytes() -> usize {
    std::env::var("LLAMA2_MAX_LINE_BYTES").ok().and_then(|v| v.trim().parse().ok()).filter(|&n| n > 0).unwrap_or(MAX_LINE_BYTES)
}

/// One line read by [`read_line_bounded`].
#[derive(Debug, PartialEq)]
pub enum BoundedLine {
    /// The line's bytes, without the newline.
    Line(Vec<u8>),
    /// Longer than the cap: its bytes were consumed up to the next newline (or the end), and
    /// dropped as they came.
    TooLong,
}

/// Reads the next line of `reader`, keeping at most `max` bytes of it in memory; None at the end.
pub fn read_line_bounded(reader: &mut impl BufRead, max: usize) -> std::io::Result<Option<BoundedLine>> {
    let mut line = Vec::new();
    let mut too_long = false;
    let mut read_any = false;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        read_any = true;
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if !too_long && line.len() + chunk.len() <= max {
            line.extend_from_slice(chunk);
        } else {
            too_long = true;
            line = Vec::new();
        }
        let used = done.unwrap_or(buf.len());
        reader.consume(used);
        if done.is_some() {
            break;
        }
    }
    if !read_any {
        return Ok(None);
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(if too_long { BoundedLine::TooLong } else { BoundedLine::Line(line) }))
}

/// The non-empty lines of a JSONL file as JSON, in order and streamed. Opening the file, a line
/// that is not UTF-8, a line longer than [`max_line_bytes`] and a line that is not JSON are
/// errors naming the file and line. A UTF-8 byte-order mark before the first line is skipped.
pub fn read_jsonl(path: &Path) -> std::io::Result<impl Iterator<Item = std::io::Result<JsonLine>>> {
    let mut reader = BufReader::new(File::open(path).map_err(|e| named(path, e))?);
    let path = path.to_path_buf();
    let max = max_line_bytes();
    let mut n = 0usize;
    let mut failed = false;
    Ok(std::iter::from_fn(move || {
        loop {
            if failed {
                return None;
            }
            let at = format!("{}:{}", path.display(), n + 1);
            let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{at}: {m}"));
            let line = match read_line_bounded(&mut reader, max) {
                Ok(None) => return None,
                Ok(Some(BoundedLine::Line(bytes))) => bytes,
                Ok(Some(BoundedLine::TooLong)) => {
                    // Past a line with no end in sight there is nothing more to read usefully.
                    failed = true;
                    return Some(Err(invalid(format!("a line longer than {max} bytes (set LLAMA2_MAX_LINE_BYTES to allow longer lines)"))));
                }
                Err(e) => {
                    failed = true;
                    return Some(Err(std::io::Error::new(e.kind(), format!("{at}: {e}"))));
                }
            };
            n += 1;
            let Ok(text) = String::from_utf8(line) else {
                return Some(Err(invalid("stream did not contain valid UTF-8".into())));
            };
            let text = if n == 1 { without_bom(&text) } else { &text };
            if text.trim().is_empty() {
                continue;
            }
            return Some(match serde_json::from_str(text) {
                Ok(value) => Ok(JsonLine { at, line: n, value }),
                Err(e) => Err(invalid(format!("invalid JSON: {e}"))),
            });
        }
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

    #[test]
    fn lines_past_the_cap_are_refused_without_being_kept() {
        let text = b"short\r\nxxxxxxxxxxxxxxxxxxxx\nlast";
        let mut r = std::io::BufReader::with_capacity(4, &text[..]);
        assert_eq!(read_line_bounded(&mut r, 8).unwrap(), Some(BoundedLine::Line(b"short".to_vec())));
        assert_eq!(read_line_bounded(&mut r, 8).unwrap(), Some(BoundedLine::TooLong));
        assert_eq!(read_line_bounded(&mut r, 8).unwrap(), Some(BoundedLine::Line(b"last".to_vec())));
        assert_eq!(read_line_bounded(&mut r, 8).unwrap(), None);
        // A JSONL file whose second line is too long: the first is read, then an error naming line 2.
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("long.jsonl");
        std::fs::write(&path, format!("{{\"a\": 1}}\n\"{}\"\n{{\"a\": 3}}\n", "y".repeat(MAX_LINE_BYTES))).unwrap();
        let got: Vec<_> = read_jsonl(&path).unwrap().collect();
        assert_eq!(got.len(), 2, "the error ends the file");
        assert_eq!(got[0].as_ref().unwrap().value["a"], 1);
        let err = got[1].as_ref().unwrap_err().to_string();
        assert!(err.contains("long.jsonl:2") && err.contains("longer than"), "{err}");
    }
}
