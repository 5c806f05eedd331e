//! `llama convert`: between native, Hugging Face and GGUF checkpoints.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use llama_model::checkpoint::{self, Format};
use llama_model::device;
use llama_model::gguf::{self, GgufTokenizer, GgufType};

#[derive(clap::Args)]
pub struct ConvertArgs {
    /// Checkpoint directory or GGUF file to read.
    #[arg(long)]
    pub from: PathBuf,
    /// Directory (or .gguf file) to write; files go to temporaries and are renamed.
    #[arg(long)]
    pub to: PathBuf,
    /// Output kind: `hf`, `native` or `gguf`.
    #[arg(long)]
    pub to_format: Option<String>,
    /// GGUF weight type: f32, f16 or q8_0 (norms are always f32).
    #[arg(long, default_value = "f16")]
    pub gguf_type: String,
    /// The tokenizer.json a GGUF output carries (default: the one in --from).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Largest Hugging Face shard in GB before splitting into model-0000x-of-0000y files.
    #[arg(long, default_value_t = 5.0)]
    pub shard_size_gb: f64,
    /// Write into an existing, non-empty --to directory (its checkpoint files are replaced;
    /// other files stay). Without it such a directory is refused.
    #[arg(long)]
    pub overwrite: bool,
}

/// `llama convert`.
pub fn run(args: ConvertArgs) -> Result<()> {
    let ConvertArgs { from, to, to_format, gguf_type, tokenizer, shard_size_gb, overwrite } = args;
    let gguf_type = GgufType::parse(&gguf_type).ok_or_else(|| anyhow::anyhow!("--gguf-type `{gguf_type}`: allowed values: {}", GgufType::ALLOWED))?;
    let from_gguf = gguf::is_gguf(&from);
    let target = match to_format.as_deref() {
        Some("hf") => Target::Dir(Format::HuggingFace),
        Some("native") => Target::Dir(Format::Native),
        Some("gguf") => Target::Gguf,
        Some(other) => bail!("--to-format `{other}`: expected `hf`, `native` or `gguf`"),
        None if to.extension().is_some_and(|e| e == "gguf") => Target::Gguf,
        None if from_gguf => Target::Dir(Format::Native),
        None if checkpoint::detect(&checkpoint::resolve(&from))? == Format::Native => Target::Dir(Format::HuggingFace),
        None => Target::Dir(Format::Native),
    };
    check_convert_target(&from, &to, overwrite, target == Target::Gguf)?;
    let device = device::parse("flex")?;
    let (config, model, tokenizer_files) = if from_gguf {
        let (config, model, metadata) = gguf::load_gguf(&from, &device)?;
        (config, model, gguf::tokenizer_files(&metadata, &from.display().to_string())?)
    } else {
        let (config, model) = checkpoint::load(&from, &device)?;
        (config, model, None)
    };
    match target {
        Target::Gguf => {
            let tokenizer = match (tokenizer, &tokenizer_files) {
                (Some(path), _) => Some(gguf_tokenizer(&path).context("--tokenizer")?),
                // GGUF to GGUF: the tokenizer the source's metadata holds goes across.
                (None, Some(files)) => Some(gguf_tokenizer_of(&crate::metadata_tokenizer(&from, files)?.0, files.tokenizer.clone())),
                (None, None) if from.join("tokenizer.json").is_file() => Some(gguf_tokenizer(&from.join("tokenizer.json"))?),
                (None, None) => {
                    eprintln!(
                        "warning: {} has no tokenizer.json and no --tokenizer was given: the GGUF file has no tokenizer, which llama.cpp needs",
                        from.display()
                    );
                    None
                }
            };
            let name = from.file_name().map_or_else(|| "llama".into(), |n| n.to_string_lossy().into_owned());
            gguf::save_gguf(&model, &config, tokenizer.as_ref(), &name, &to, gguf_type)?;
        }
        Target::Dir(format) => {
            match format {
                Format::HuggingFace => checkpoint::save_hf(&model, &config, &to, (shard_size_gb * 1e9) as u64)?,
                Format::Native => checkpoint::save_native(&model, &config, &to)?,
            }
            remove_other_kind(&to, format)?;
            if let Some(files) = tokenizer_files {
                llama_io::write_atomic(&to.join("tokenizer.json"), files.tokenizer.as_bytes())?;
                llama_io::write_atomic(&to.join("tokenizer_config.json"), files.config.as_bytes())?;
            }
            for extra in llama_io::TOKENIZER_FILES {
                let src = from.join(extra);
                if src.is_file() {
                    std::fs::copy(&src, to.join(extra)).with_context(|| format!("copying {}", src.display()))?;
                }
            }
        }
    }
    println!("wrote {target:?} to {} ({} parameters)", to.display(), config.num_params());
    Ok(())
}

/// The tokenizer at `path` as a GGUF file carries it: BOS, EOS and chat template as
/// `llama_data::Tokenizer` reads them from the checkpoint's tokenizer files.
fn gguf_tokenizer(path: &Path) -> Result<GgufTokenizer> {
    let tok = llama_data::Tokenizer::from_file(path)?;
    let json = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(gguf_tokenizer_of(&tok, json))
}

/// `tok`, whose `tokenizer.json` text is `json`, as a GGUF file carries it.
fn gguf_tokenizer_of(tok: &llama_data::Tokenizer, json: String) -> GgufTokenizer {
    let text = |id: u32| tok.token_text(id).unwrap_or_default();
    let chat_template = tok.declared_chat_template().unwrap_or(gguf::LLAMA2_CHAT_TEMPLATE).to_string();
    GgufTokenizer { json, bos: text(tok.bos_id()), eos: text(tok.eos_id()), chat_template, add_bos: tok.declared_add_bos() }
}

/// After `--overwrite` wrote a checkpoint of kind `written` into `dir`, removes the checkpoint
/// files that were there before and are not part of it (the other kind's config, an old index,
/// weight shards of another split), so the directory holds one checkpoint: left behind, an old
/// `config.json` beside new native weights would load into `transformers` as garbage without a
/// word, and an old `config.toml` would shadow new HF files.
fn remove_other_kind(dir: &Path, written: Format) -> Result<()> {
    let mut kept: Vec<String> = match written {
        Format::Native => vec![checkpoint::NATIVE_CONFIG.into(), checkpoint::NATIVE_WEIGHTS.into()],
        Format::HuggingFace => vec![checkpoint::HF_CONFIG.into()],
    };
    if written == Format::HuggingFace {
        let index = dir.join(checkpoint::HF_INDEX);
        if index.is_file() {
            let text = std::fs::read_to_string(&index).with_context(|| format!("reading {}", index.display()))?;
            let json: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("reading {}", index.display()))?;
            kept.push(checkpoint::HF_INDEX.into());
            kept.extend(json["weight_map"].as_object().into_iter().flat_map(|m| m.values()).filter_map(|v| v.as_str().map(String::from)));
        } else {
            kept.push(checkpoint::NATIVE_WEIGHTS.into());
        }
    }
    let checkpoint_file = |name: &str| {
        [checkpoint::NATIVE_CONFIG, checkpoint::HF_CONFIG, checkpoint::NATIVE_WEIGHTS, checkpoint::NATIVE_WEIGHTS_BURNPACK, checkpoint::HF_INDEX]
            .contains(&name)
            || (name.starts_with("model-") && name.ends_with(".safetensors"))
    };
    for entry in std::fs::read_dir(dir).with_context(|| format!("--to {}", dir.display()))? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        if path.is_file() && checkpoint_file(name) && !kept.iter().any(|k| k == name) {
            std::fs::remove_file(&path).with_context(|| format!("removing the replaced {}", path.display()))?;
            eprintln!("removed {} (of the checkpoint this one replaces)", path.display());
        }
    }
    Ok(())
}

/// What `convert` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Dir(Format),
    Gguf,
}

/// Refuses a conversion that would write over its own input, or into an existing directory
/// holding anything unless `--overwrite` says so (it may be another model).
fn check_convert_target(from: &Path, to: &Path, overwrite: bool, file: bool) -> Result<()> {
    if !to.exists() {
        return Ok(());
    }
    if from.canonicalize().ok() == Some(to.canonicalize()?) {
        bail!("--to {} is the --from checkpoint: write the conversion elsewhere", to.display());
    }
    if file {
        if to.is_dir() {
            bail!("--to {} is a directory; a GGUF output is one file (e.g. model.gguf)", to.display());
        }
        if !overwrite {
            bail!("--to {} exists; pass --overwrite to replace it, or choose another file", to.display());
        }
        return Ok(());
    }
    let occupied = std::fs::read_dir(to).with_context(|| format!("--to {}", to.display()))?.next().is_some();
    if occupied && !overwrite {
        bail!("--to {} exists and is not empty; pass --overwrite to replace the checkpoint files in it, or choose another directory", to.display());
    }
    Ok(())
}
