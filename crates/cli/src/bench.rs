//! `llama bench`: training steps and KV-cache generation on random tokens, timed.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use llama_model::generate::{SamplingConfig, generate, generate_in_slots, generate_until};
use llama_model::recompute::MemorySaving;
use llama_model::{LlamaConfig, Precision, Recompute, device};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// A TOML file with a [model] table (configs/bench-small.toml, configs/bench-medium.toml).
    #[arg(long)]
    pub config: PathBuf,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Timed training steps (after one warm-up step); 0 skips training (decoding only).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Tokens generated per sequence (batch `batch`, prompts of 16 tokens); 0 skips generation.
    #[arg(long, default_value_t = 64)]
    pub gen_tokens: usize,
    /// Batch sizes to time decoding at, comma-separated (e.g. `1,8,32,64`), each in its own
    /// line and as `decode_tokens_per_s_by_batch` in the JSON; default: `--batch` alone.
    #[arg(long, value_delimiter = ',')]
    pub decode_batches: Vec<usize>,
    /// Also decode this many prompts whose answers end after 1 to `--gen-tokens` tokens (uniform,
    /// seeded), `--batch` rows at a time: in fixed batches (each decoded until its longest row
    /// ends) and with continuous batching (a finished row's slot takes the next prompt). Lines
    /// `ragged`; JSON `ragged_fixed_tokens_per_s`, `ragged_continuous_tokens_per_s`.
    #[arg(long, default_value_t = 0)]
    pub ragged_prompts: usize,
    /// Sampling temperature of the timed decoding (0: greedy, as Hugging Face `generate`'s
    /// default; 1.2: rejection sampling's), from the whole softmax, seeded.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value = "flex")]
    pub device: String,
    /// Compute dtype of the training steps: f32, or bf16 / f16 mixed precision (f32 master
    /// weights and AdamW state, forward and backward in the half type, as `pretrain` does).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Write the figures as JSON here too.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Run Burn's composed tensor ops instead of our fused CPU kernels (cross-entropy,
    /// attention, RoPE, SwiGLU, RMSNorm, AdamW), to measure what they buy; attention then
    /// takes the GPU path (see --burn-attention). No effect on GPUs, where the composed ops
    /// always run.
    #[arg(long)]
    pub unfused: bool,
    /// Attention through Burn's composed op (under autodiff: about ten tensor ops, two
    /// score-sized tensors per layer kept for backward) instead of ours (the fused CPU kernel
    /// on flex f32; elsewhere Burn's forward with the probabilities recomputed in backward),
    /// to measure what ours buys.
    #[arg(long)]
    pub burn_attention: bool,
    /// Keep only each block's input and re-run the block in backward (train.recompute).
    #[arg(long, value_enum, default_value_t = Recompute::None)]
    pub recompute: Recompute,
    /// Positions per chunk of the output projection and loss (train.logits_chunk; default:
    /// 1024 with --recompute block, else the whole logits).
    #[arg(long)]
    pub logits_chunk: Option<usize>,
}

/// What `llama bench` decodes: `tokens` per sequence (0: nothing) at each batch size.
struct Decode<'a> {
    tokens: usize,
    batches: &'a [usize],
    ragged_prompts: usize,
    temperature: f32,
}

/// `llama bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    let BenchArgs {
        config,
        batch,
        seq_len,
        steps,
        gen_tokens,
        decode_batches,
        ragged_prompts,
        temperature,
        device,
        dtype,
        json,
        unfused,
        burn_attention,
        recompute,
        logits_chunk,
    } = args;
    let precision = Precision::parse(&dtype).ok_or_else(|| anyhow::anyhow!("--dtype `{dtype}`: allowed values: {}", Precision::ALLOWED))?;
    if batch == 0 || seq_len == 0 || logits_chunk == Some(0) || decode_batches.contains(&0) {
        bail!("--batch, --seq-len, --logits-chunk and --decode-batches must be > 0");
    }
    if !(temperature >= 0.0 && temperature.is_finite()) {
        bail!("--temperature must be a finite number >= 0 (got {temperature})");
    }
    let saving = MemorySaving::new(recompute, logits_chunk);
    let ops = BenchOps { fused: !unfused, our_attention: !burn_attention };
    let decode_batches = if decode_batches.is_empty() { vec![batch] } else { decode_batches };
    let run = || {
        bench(
            &config,
            batch,
            seq_len,
            steps,
            Decode { tokens: gen_tokens, batches: &decode_batches, ragged_prompts, temperature },
            &device,
            precision,
            json,
            ops,
            saving,
        )
    };
    // The switches are per thread; every op of the benchmark runs on this one.
    let run = || if unfused { llama_model::without_fused_kernels(run) } else { run() };
    if burn_attention { llama_model::attention::with_burn_attention(run) } else { run() }
}

fn peak_rss_gib() -> f64 {
    llama_model::host_memory::peak_rss_bytes().map_or(0.0, |b| b as f64 / (1u64 << 30) as f64)
}

/// Which of our own ops `llama bench` runs (both by default).
#[derive(Clone, Copy)]
struct BenchOps {
    /// The fused CPU kernels (off: `--unfused`).
    fused: bool,
    /// Our attention ops (off: `--burn-attention`).
    our_attention: bool,
}

#[allow(clippy::too_many_arguments)]
fn bench(
    config: &std::path::Path,
    batch: usize,
    seq_len: usize,
    steps: usize,
    decode: Decode,
    device: &str,
    precision: Precision,
    json: Option<PathBuf>,
    ops: BenchOps,
    saving: MemorySaving,
) -> Result<()> {
    use burn::module::Module;
    use burn::optim::{GradientsParams, ModuleOptimizer};
    use burn::tensor::{Int, Tensor, TensorData};
    use llama_model::adamw::FusedAdamW;
    use std::time::Instant;
    let c = LlamaConfig::from_toml_file(config)?;
    if seq_len > c.max_seq_len {
        bail!("--seq-len {seq_len} exceeds model.max_seq_len {}", c.max_seq_len);
    }
    let device_spec = device;
    let device = device::parse(device_spec)?.autodiff();
    precision.check_device(&device, device_spec).map_err(anyhow::Error::msg)?;
    device.seed(0);
    let mut model = c.init(&device);
    let mut optim = ModuleOptimizer::from(FusedAdamW::new(0.9, 0.95, 1e-5, 0.1));
    let mut rng = 12345u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % c.vocab_size as u64) as i64
    };
    let tokens: Vec<i64> = (0..batch * (seq_len + 1)).map(|_| next()).collect();
    let inputs: Vec<i64> = tokens.chunks(seq_len + 1).flat_map(|w| w[..seq_len].to_vec()).collect();
    let targets: Vec<i64> = tokens.chunks(seq_len + 1).flat_map(|w| w[1..].to_vec()).collect();
    let inputs = Tensor::<2, Int>::from_data(TensorData::new(inputs, [batch, seq_len]), &device);
    let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [batch * seq_len]), &device);
    let (mut fwd, mut bwd, mut opt) = (0.0, 0.0, 0.0);
    // No timed step: no warm-up either (a decoding-only run).
    for step in (0..=steps).filter(|_| steps > 0) {
        let t0 = Instant::now();
        let loss = llama_model::recompute::with_memory_saving(saving, || {
            let compute = precision.compute_copy(&model);
            compute.token_nll(compute.forward_hidden(inputs.clone(), None), targets.clone()).mean()
        });
        let loss_value = loss.clone().into_scalar::<f32>();
        let t1 = Instant::now();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        // Materialise the gradients before stopping the clock (backends may be lazy).
        let _ = model.norm.gamma.val().sum().into_scalar::<f32>();
        let t2 = Instant::now();
        model = optim.step(1e-4, model, grads);
        let _ = model.norm.gamma.val().sum().into_scalar::<f32>();
        let t3 = Instant::now();
        if step == 0 {
            // On a GPU the untimed first step compiles the kernels: say so, or a long silence looks like a hang.
            eprintln!("warm-up step: {:.1} s", (t3 - t0).as_secs_f64());
        }
        if step > 0 {
            fwd += (t1 - t0).as_secs_f64();
            bwd += (t2 - t1).as_secs_f64();
            opt += (t3 - t2).as_secs_f64();
        }
        if !loss_value.is_finite() {
            bail!("non-finite loss in the benchmark");
        }
    }
    let n = steps.max(1) as f64;
    let step_s = (fwd + bwd + opt) / n;
    let train_tok_s = (batch * seq_len) as f64 / step_s;
    let gflops = train_tok_s * c.train_flops_per_token(seq_len) / 1e9;
    let mut report = serde_json::json!({
        "config": config.display().to_string(), "dtype": precision.name(), "params": c.num_params(), "batch": batch, "seq_len": seq_len, "steps": steps,
        "fused_kernels": ops.fused, "our_attention": ops.our_attention,
        "recompute": if saving.recompute_blocks { "block" } else { "none" }, "logits_chunk": saving.logits_chunk,
    });
    if steps > 0 {
        let train = serde_json::json!({
            "train_tokens_per_s": train_tok_s, "forward_s": fwd / n, "backward_s": bwd / n, "optimizer_s": opt / n, "train_gflops_per_s": gflops,
        });
        report.as_object_mut().expect("an object").extend(train.as_object().expect("an object").clone());
    }
    let attention = if ops.our_attention { "" } else { ", Burn's attention (--burn-attention)" };
    let ops = if ops.fused { "" } else { ", Burn's composed ops (--unfused)" };
    let recompute = if saving.recompute_blocks { ", block recomputation" } else { "" };
    let chunks = saving.logits_chunk.map_or(String::new(), |c| format!(", logits in chunks of {c}"));
    println!(
        "model {} ({} parameters), batch {batch} x seq {seq_len}, {}{ops}{attention}{recompute}{chunks}",
        config.display(),
        c.num_params(),
        precision.name()
    );
    if steps > 0 {
        println!(
            "train  {train_tok_s:>10.1} tokens/s | step {:.3} s = forward {:.3} + backward {:.3} + AdamW {:.3} | {gflops:.1} GFLOP/s",
            step_s,
            fwd / n,
            bwd / n,
            opt / n
        );
    }
    let gen_tokens = decode.tokens;
    if gen_tokens > 0 {
        let plain = model.valid();
        let sampling = SamplingConfig { eos_id: None, temperature: decode.temperature, ..SamplingConfig::greedy(gen_tokens) };
        let mut by_batch = serde_json::Map::new();
        for &batch in decode.batches {
            let prompts: Vec<Vec<u32>> = (0..batch).map(|_| (0..16).map(|_| next() as u32).collect()).collect();
            let _ = generate(&plain, &prompts, &SamplingConfig { max_new_tokens: 2, ..sampling.clone() })?;
            let t = Instant::now();
            let out = generate(&plain, &prompts, &sampling)?;
            let secs = t.elapsed().as_secs_f64();
            let produced: usize = out.tokens.iter().map(Vec::len).sum();
            println!("decode {:>10.1} tokens/s | {produced} tokens ({batch} x {gen_tokens}) in {secs:.3} s, KV cache", produced as f64 / secs);
            report["decode_tokens_per_s"] = serde_json::json!(produced as f64 / secs);
            by_batch.insert(batch.to_string(), serde_json::json!(produced as f64 / secs));
        }
        report["decode_tokens_per_s_by_batch"] = serde_json::Value::Object(by_batch);
        if decode.ragged_prompts > 0 {
            let n = decode.ragged_prompts;
            let prompts: Vec<Vec<u32>> = (0..n).map(|_| (0..16).map(|_| next() as u32).collect()).collect();
            let ends: Vec<usize> = (0..n).map(|_| 1 + next() as usize % gen_tokens).collect();
            let seeds = vec![0; n];
            let produced: usize = ends.iter().sum();
            let t = Instant::now();
            for (i, rows) in prompts.chunks(batch).enumerate() {
                let ends = &ends[i * batch..];
                generate_until(&plain, rows, &sampling, &seeds[..rows.len()], |_, _| {}, |row, tokens| tokens.len() >= ends[row])?;
            }
            let fixed = produced as f64 / t.elapsed().as_secs_f64();
            let t = Instant::now();
            generate_in_slots(&plain, &prompts, &sampling, &seeds, batch, |_, _| {}, |row, tokens| tokens.len() >= ends[row])?;
            let continuous = produced as f64 / t.elapsed().as_secs_f64();
            println!("ragged {continuous:>10.1} tokens/s continuous, {fixed:.1} in fixed batches | {n} prompts, {produced} tokens, {batch} rows at a time");
            report["ragged_fixed_tokens_per_s"] = serde_json::json!(fixed);
            report["ragged_continuous_tokens_per_s"] = serde_json::json!(continuous);
        }
    }
    let peak = peak_rss_gib();
    println!("peak RSS {peak:.3} GiB");
    report["peak_rss_gib"] = serde_json::json!(peak);
    if let Some(pool) = device.memory_pool_usage() {
        let gib = pool.bytes_reserved as f64 / (1u64 << 30) as f64;
        println!("device memory reserved by Burn's pool {gib:.3} GiB");
        report["device_reserved_gib"] = serde_json::json!(gib);
    }
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
