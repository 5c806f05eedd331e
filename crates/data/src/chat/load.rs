//! Conversations from JSONL or Parquet files, each checked, errors naming the file and line.

use std::path::Path;

use super::Conversation;
use crate::DataError;

/// Reads conversations from `.jsonl` (one object per line) or `.parquet` (a `messages` column of
/// `list<struct<role, content>>`, or `prompt`/`response` string columns). Errors name the file
/// and line (or row).
pub fn load_conversations(path: &Path) -> Result<Vec<Conversation>, DataError> {
    load_checked(path, |_| Ok(()))
}

/// [`load_conversations`] for fine-tuning data: a conversation with no answer to learn from (only
/// a user turn, or every answer marked `"train": false`) is refused, naming the file and line,
/// since it would be read, packed and trained on without adding one token of loss.
pub fn load_training_conversations(path: &Path) -> Result<Vec<Conversation>, DataError> {
    load_checked(path, |c| {
        if c.exchanges().iter().any(|(_, answer)| answer.is_some_and(|a| a.train)) {
            Ok(())
        } else {
            Err("no assistant answer to train on (a fine-tuning chat needs at least one assistant turn that is not `\"train\": false`)".into())
        }
    })
}

/// Loads conversations and applies `check` to each; errors name the file and line (or row).
fn load_checked(path: &Path, check: impl Fn(&Conversation) -> Result<(), String>) -> Result<Vec<Conversation>, DataError> {
    let parse = |value: &serde_json::Value| Conversation::from_json(value).and_then(|c| check(&c).map(|()| c));
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl" | "json") => llama_io::read_jsonl(path)?
            .map(|line| {
                let line = line?;
                parse(&line.value).map_err(|e| DataError::Input(format!("{}: {e}", line.at)))
            })
            .collect(),
        Some("parquet") => load_parquet(path, parse),
        _ => Err(DataError::Config(format!("{}: unsupported chat file; expected .jsonl or .parquet", path.display()))),
    }
}

fn load_parquet(path: &Path, parse: impl Fn(&serde_json::Value) -> Result<Conversation, String>) -> Result<Vec<Conversation>, DataError> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let err = |m: String| DataError::Input(format!("{}: {m}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| DataError::Io(format!("{}: {e}", path.display())))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| err(format!("not a readable Parquet file: {e}")))?
        .build()
        .map_err(|e| err(e.to_string()))?;
    let mut out = vec![];
    for batch in reader {
        let batch = batch.map_err(|e| err(e.to_string()))?;
        // Each row becomes the JSON form, so one parser validates both formats.
        for value in arrow_rows_to_json(&batch).map_err(err)? {
            let row = out.len();
            out.push(parse(&value).map_err(|e| err(format!("row {row}: {e}")))?);
        }
    }
    Ok(out)
}

/// Turns the `messages` / `prompt` / `response` / `system` columns of a batch into JSON rows.
fn arrow_rows_to_json(batch: &arrow_array::RecordBatch) -> Result<Vec<serde_json::Value>, String> {
    use arrow_array::Array;
    use arrow_array::cast::AsArray;
    use arrow_schema::DataType;
    let string_at = |col: &dyn Array, i: usize| -> Option<String> {
        match col.data_type() {
            DataType::Utf8 => Some(col.as_string::<i32>().value(i).to_string()),
            DataType::LargeUtf8 => Some(col.as_string::<i64>().value(i).to_string()),
            DataType::Utf8View => Some(col.as_string_view().value(i).to_string()),
            _ => None,
        }
    };
    let schema = batch.schema();
    let mut rows = vec![serde_json::Map::new(); batch.num_rows()];
    for (field, col) in schema.fields().iter().zip(batch.columns()) {
        match field.name().as_str() {
            "prompt" | "response" | "system" => {
                for (i, row) in rows.iter_mut().enumerate() {
                    if col.is_null(i) {
                        continue;
                    }
                    let s = string_at(col.as_ref(), i).ok_or(format!("column `{}` is not a string column", field.name()))?;
                    row.insert(field.name().clone(), s.into());
                }
            }
            "messages" => {
                let list = match col.data_type() {
                    DataType::List(_) => col.as_list::<i32>(),
                    other => return Err(format!("column `messages` has type {other}; expected list<struct<role, content>>")),
                };
                for (i, row) in rows.iter_mut().enumerate() {
                    let items = list.value(i);
                    let s = items.as_struct_opt().ok_or("`messages` items are not structs with role and content")?;
                    let role = s.column_by_name("role").ok_or("`messages` items have no `role`")?;
                    let content = s.column_by_name("content").ok_or("`messages` items have no `content`")?;
                    let msgs: Vec<serde_json::Value> =
                        (0..s.len()).map(|j| serde_json::json!({ "role": string_at(role.as_ref(), j), "content": string_at(content.as_ref(), j) })).collect();
                    row.insert("messages".into(), msgs.into());
                }
            }
            _ => {}
        }
    }
    Ok(rows.into_iter().map(serde_json::Value::Object).collect())
}
