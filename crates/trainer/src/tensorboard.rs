//! A small TensorBoard event-file writer (scalars and text), on `prost` and `crc32c`.
//!
//! The crate users know, `tensorboard-rs`, is unmaintained, pulls a `protobuf` with a security
//! advisory and panics on text; this is the format itself, a few dozen lines. An event file is a
//! sequence of TFRecord frames: `u64 length (LE) | masked crc32c(length) | Event proto |
//! masked crc32c(Event)`. The first event carries `file_version = "brain.Event:2"`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;

#[derive(Clone, PartialEq, Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
    #[prost(message, optional, tag = "7")]
    session_log: Option<SessionLog>,
}

/// TensorFlow's `SessionLog`; only `status` is written.
#[derive(Clone, PartialEq, Message)]
struct SessionLog {
    /// 1 = START.
    #[prost(int32, tag = "1")]
    status: i32,
}

#[derive(Clone, PartialEq, Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

#[derive(Clone, PartialEq, Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
    #[prost(message, optional, tag = "8")]
    tensor: Option<TensorProto>,
    #[prost(message, optional, tag = "9")]
    metadata: Option<SummaryMetadata>,
}

#[derive(Clone, PartialEq, Message)]
struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    plugin_data: Option<PluginData>,
}

#[derive(Clone, PartialEq, Message)]
struct PluginData {
    #[prost(string, tag = "1")]
    plugin_name: String,
    #[prost(bytes = "vec", tag = "2")]
    content: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
struct TensorProto {
    /// 7 = DT_STRING.
    #[prost(int32, tag = "1")]
    dtype: i32,
    #[prost(message, optional, tag = "2")]
    tensor_shape: Option<TensorShape>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    string_val: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
struct TensorShape {
    #[prost(message, repeated, tag = "2")]
    dim: Vec<Dim>,
}

#[derive(Clone, PartialEq, Message)]
struct Dim {
    #[prost(int64, tag = "1")]
    size: i64,
}

fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Appends events to one `events.out.tfevents.*` file in a log directory.
pub struct EventWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates a new event file in `dir` (created if needed).
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
        // TensorBoard reads a directory's event files in name order: a resumed run's file must
        // sort after the earlier ones (its restart mark discards what they hold of redone steps),
        // even when it starts within the same second.
        let latest = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("events.out.tfevents.")?.split('.').next()?.parse::<u64>().ok())
            .max();
        let secs = latest.map_or(now.as_secs(), |l| now.as_secs().max(l + 1));
        let mut n = 0;
        let path = loop {
            let p = dir.join(format!("events.out.tfevents.{secs}.{host}.{}.{n}", std::process::id()));
            if !p.exists() {
                break p;
            }
            n += 1;
        };
        let mut w = Self { out: BufWriter::new(File::create(&path)?), path };
        w.write_event(&Event { wall_time: now.as_secs_f64(), step: 0, file_version: Some("brain.Event:2".into()), summary: None, session_log: None })?;
        w.flush()?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_event(&mut self, event: &Event) -> std::io::Result<()> {
        let data = event.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        self.out.write_all(&len)?;
        self.out.write_all(&masked_crc(&len).to_le_bytes())?;
        self.out.write_all(&data)?;
        self.out.write_all(&masked_crc(&data).to_le_bytes())
    }

    fn now() -> f64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
    }

    /// One scalar point of the curve `tag`.
    pub fn scalar(&mut self, tag: &str, step: u64, value: f64) -> std::io::Result<()> {
        let value = SummaryValue { tag: tag.into(), simple_value: Some(value as f32), tensor: None, metadata: None };
        self.write_event(&Event {
            wall_time: Self::now(),
            step: step as i64,
            file_version: None,
            summary: Some(Summary { value: vec![value] }),
            session_log: None,
        })
    }

    /// A text entry (shown in TensorBoard's Text tab; markdown is rendered).
    pub fn text(&mut self, tag: &str, step: u64, text: &str) -> std::io::Result<()> {
        let value = SummaryValue {
            tag: tag.into(),
            simple_value: None,
            tensor: Some(TensorProto { dtype: 7, tensor_shape: Some(TensorShape { dim: vec![Dim { size: 1 }] }), string_val: vec![text.as_bytes().to_vec()] }),
            metadata: Some(SummaryMetadata { plugin_data: Some(PluginData { plugin_name: "text".into(), content: vec![] }) }),
        };
        self.write_event(&Event {
            wall_time: Self::now(),
            step: step as i64,
            file_version: None,
            summary: Some(Summary { value: vec![value] }),
            session_log: None,
        })
    }

    /// Marks a (re)start at `step`: TensorBoard's readers then discard every event of this log
    /// directory with a step at or after it that came before the mark (TensorFlow's
    /// `SessionLog.START`, what a resumed run writes so that redone steps are shown once).
    pub fn session_start(&mut self, step: u64) -> std::io::Result<()> {
        self.write_event(&Event { wall_time: Self::now(), step: step as i64, file_version: None, summary: None, session_log: Some(SessionLog { status: 1 }) })
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the frames back, checking both CRCs, and decodes the events.
    fn read_events(path: &Path) -> Vec<Event> {
        let bytes = std::fs::read(path).unwrap();
        let mut events = vec![];
        let mut i = 0;
        while i < bytes.len() {
            let len_bytes = &bytes[i..i + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            assert_eq!(u32::from_le_bytes(bytes[i + 8..i + 12].try_into().unwrap()), masked_crc(len_bytes));
            let data = &bytes[i + 12..i + 12 + len];
            assert_eq!(u32::from_le_bytes(bytes[i + 12 + len..i + 16 + len].try_into().unwrap()), masked_crc(data));
            events.push(Event::decode(data).unwrap());
            i += 16 + len;
        }
        events
    }

    #[test]
    fn frames_have_valid_crcs_and_decode() {
        // Known value: the masked CRC of the empty string, as TensorFlow computes it.
        assert_eq!(masked_crc(b""), 0xa282_ead8);
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalar("train/loss", 3, 2.5).unwrap();
        w.text("samples", 3, "hello **world**").unwrap();
        w.flush().unwrap();
        let events = read_events(w.path());
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        let v = &events[1].summary.as_ref().unwrap().value[0];
        assert_eq!((events[1].step, v.tag.as_str(), v.simple_value), (3, "train/loss", Some(2.5)));
        let t = &events[2].summary.as_ref().unwrap().value[0];
        assert_eq!(t.tensor.as_ref().unwrap().string_val[0], b"hello **world**");
    }

    /// A second writer in the same directory (a resumed run), started within the same second,
    /// gets a file that sorts after the first (TensorBoard reads them in name order); its restart
    /// mark is a `SessionLog` START at the given step.
    #[test]
    fn a_later_writer_sorts_after_and_marks_its_restart() {
        let dir = tempfile::tempdir().unwrap();
        let first = EventWriter::create(dir.path()).unwrap();
        let mut second = EventWriter::create(dir.path()).unwrap();
        assert!(second.path() > first.path(), "{:?} should sort after {:?}", second.path(), first.path());
        second.session_start(4).unwrap();
        second.flush().unwrap();
        let events = read_events(second.path());
        assert_eq!((events[1].step, events[1].session_log.as_ref().map(|l| l.status)), (4, Some(1)));
    }
}
