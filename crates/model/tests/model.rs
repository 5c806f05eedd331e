//! Architecture tests: shapes, causality, GQA, RoPE, gradients, cached decoding, generation.

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use llama_model::device_check::{all_grads, gqa_batch, gradient_deviations, loss_and_grads};
use llama_model::generate::{BatchDecoder, SamplingConfig, generate, generate_in_slots, generate_until, log_softmax_at, row_seed};
use llama_model::recompute::{MemorySaving, with_memory_saving};
use llama_model::{Llama, LlamaConfig};

fn tiny(vocab: usize, kv: usize) -> LlamaConfig {
    LlamaConfig::new(32, 2, 4).with_n_kv_heads(kv).with_vocab_size(vocab).with_multiple_of(16).with_max_seq_len(64)
}

fn ids(rows: &[Vec<u32>], device: &Device) -> Tensor<2, Int> {
    let t = rows[0].len();
    let flat: Vec<i64> = rows.iter().flatten().map(|&x| x as i64).collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), t]), device)
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn forward_shapes_and_parameter_count() {
    let device = Device::flex();
    let config = tiny(50, 2);
    let model = config.init(&device);
    let logits = model.forward(ids(&[vec![1, 2, 3, 4, 5], vec![6, 7, 8, 9, 10]], &device));
    assert_eq!(logits.dims(), [2, 5, 50]);
    assert_eq!(model.num_params() as u64, config.num_params());
    let tied = tiny(50, 2).with_tie_word_embeddings(true);
    assert_eq!(tied.init(&device).num_params() as u64, tied.num_params());
    assert_eq!(tied.num_params() + 50 * 32, config.num_params());
}

#[test]
fn changing_a_token_never_changes_earlier_logits() {
    let device = Device::flex();
    let model = tiny(50, 4).init(&device);
    let a = host(model.forward(ids(&[vec![1, 2, 3, 4, 5, 6]], &device)));
    let b = host(model.forward(ids(&[vec![1, 2, 3, 49, 5, 6]], &device)));
    let v = 50;
    assert!(max_abs_diff(&a[..3 * v], &b[..3 * v]) == 0.0, "positions before 3 must not move");
    assert!(max_abs_diff(&a[3 * v..4 * v], &b[3 * v..4 * v]) > 1e-4, "position 3 must move");
}

/// A GQA model equals the MHA model whose key/value heads are the GQA heads repeated.
#[test]
fn grouped_query_attention_equals_repeated_heads() {
    let device = Device::flex();
    let gqa = tiny(40, 2).init(&device);
    let mut mha = tiny(40, 4).init(&device);
    let hd = 8;
    let repeat = |w: Tensor<2>| -> Tensor<2> {
        // [dim, 2 * hd] -> [dim, 4 * hd], kv head h serves query heads 2h and 2h+1.
        let [d, _] = w.dims();
        w.reshape([d, 2, 1, hd]).repeat_dim(2, 2).reshape([d, 4 * hd])
    };
    mha.tok_embeddings = gqa.tok_embeddings.clone();
    mha.norm = gqa.norm.clone();
    mha.output = gqa.output.clone();
    for (m, g) in mha.layers.iter_mut().zip(&gqa.layers) {
        m.attention_norm = g.attention_norm.clone();
        m.ffn_norm = g.ffn_norm.clone();
        m.feed_forward = g.feed_forward.clone();
        m.attention.wq = g.attention.wq.clone();
        m.attention.wo = g.attention.wo.clone();
        let (wk, wv) = (repeat(g.attention.wk.weight.val()), repeat(g.attention.wv.weight.val()));
        m.attention.wk.weight = m.attention.wk.weight.clone().map(|_| wk);
        m.attention.wv.weight = m.attention.wv.weight.clone().map(|_| wv);
    }
    let input = ids(&[vec![1, 7, 3, 9, 5, 11, 2]], &device);
    let diff = max_abs_diff(&host(gqa.forward(input.clone())), &host(mha.forward(input)));
    assert!(diff < 1e-5, "GQA vs repeated MHA: {diff}");
}

/// Meta's RoPE: pair (x[2i], x[2i+1]) at position p rotated by p * theta^(-2i/d).
#[test]
fn rope_matches_the_direct_formula() {
    let device = Device::flex();
    let model = tiny(40, 4).init(&device);
    let (t, hd) = (6, 8);
    let x: Vec<f32> = (0..t * hd).map(|i| ((i * 37 % 17) as f32 - 8.0) / 5.0).collect();
    let start = 3;
    let got = host(model.rope.apply(Tensor::<4>::from_data(TensorData::new(x.clone(), [1, 1, t, hd]), &device), llama_model::Positions::From(start)));
    let mut want = vec![0.0f32; t * hd];
    for p in 0..t {
        let pos = (p + start) as f64;
        for i in 0..hd / 2 {
            let angle = pos * 10000f64.powf(-((2 * i) as f64) / hd as f64);
            let (a, b) = (x[p * hd + 2 * i] as f64, x[p * hd + 2 * i + 1] as f64);
            want[p * hd + 2 * i] = (a * angle.cos() - b * angle.sin()) as f32;
            want[p * hd + 2 * i + 1] = (a * angle.sin() + b * angle.cos()) as f32;
        }
    }
    let diff = max_abs_diff(&got, &want);
    assert!(diff < 1e-5, "RoPE differs from the formula by {diff}");
}

fn loss_of(model: &Llama, input: &Tensor<2, Int>, targets: &[usize]) -> Tensor<1> {
    let logits = model.forward(input.clone());
    let [b, t, v] = logits.dims();
    let logp = burn::tensor::activation::log_softmax(logits.reshape([b * t, v]), 1);
    let idx = Tensor::<2, Int>::from_data(TensorData::new(targets.iter().map(|&x| x as i64).collect::<Vec<_>>(), [b * t, 1]), &input.device());
    logp.gather(1, idx).sum().neg()
}

/// Autodiff gradients of a tiny model against central finite differences.
#[test]
fn gradients_match_finite_differences() {
    let device = Device::flex().autodiff();
    let config = LlamaConfig::new(16, 2, 2).with_n_kv_heads(1).with_vocab_size(13).with_multiple_of(8).with_max_seq_len(16);
    let model = config.init(&device);
    // Unseeded on purpose: every run checks another random model.
    let input = ids(&[vec![1, 4, 7, 2, 9]], &device);
    let targets = [4, 7, 2, 9, 3];
    let grads = loss_of(&model, &input, &targets).backward();
    type Getter = fn(&mut Llama) -> &mut burn::module::Param<Tensor<2>>;
    let probes: [(&str, Getter); 5] = [
        ("wq", |m| &mut m.layers[0].attention.wq.weight),
        ("wk", |m| &mut m.layers[1].attention.wk.weight),
        ("w2", |m| &mut m.layers[0].feed_forward.w2.weight),
        ("embedding", |m| &mut m.tok_embeddings.weight),
        ("output", |m| &mut m.output.as_mut().unwrap().weight),
    ];
    for (name, get) in probes {
        let mut probe = model.clone();
        let param = get(&mut probe).val();
        let shape = param.dims();
        let analytic = host(param.grad(&grads).expect("gradient"));
        let values = host(get(&mut probe).val());
        // Three entries: the one with the largest gradient and two fixed ones.
        let largest = (0..analytic.len()).max_by(|&a, &b| analytic[a].abs().total_cmp(&analytic[b].abs())).unwrap();
        for idx in [largest, 0, analytic.len() / 2] {
            let eps = 1e-2f32;
            let eval = |delta: f32| -> f64 {
                let mut v = values.clone();
                v[idx] += delta;
                let mut m = model.clone();
                let p = get(&mut m);
                let t = Tensor::<2>::from_data(TensorData::new(v, shape), &device);
                *p = p.clone().map(|_| t);
                loss_of(&m, &input, &targets).into_scalar::<f32>() as f64
            };
            // Central differences at eps and eps/2, Richardson-extrapolated: the eps^2 curvature
            // error cancels (a single eps = 1e-2 difference was off by 2% on a curved entry).
            let central = |h: f32| (eval(h) - eval(-h)) / (2.0 * h as f64);
            let numeric = (4.0 * central(eps / 2.0) - central(eps)) / 3.0;
            let a = analytic[idx] as f64;
            let tol = 2e-2 * a.abs().max(numeric.abs()).max(1e-1);
            assert!((a - numeric).abs() < tol, "{name}[{idx}]: autodiff {a} vs finite difference {numeric}");
        }
    }
}

/// Cached incremental decoding equals full forward passes, for prompts of different lengths;
/// with the decoding kernels, each step writes its logits into the buffer the last step's were
/// handed back in (no allocation of the logits per token).
#[test]
fn cached_decoding_equals_full_forward() {
    let device = Device::flex();
    let config = tiny(60, 2);
    let model = config.init(&device);
    let prompts = vec![vec![1u32, 5, 9], vec![1, 22, 33, 44, 55, 6, 7], vec![1, 8, 8, 8, 9]];
    let steps = 5;
    let (mut decoder, mut logits) = BatchDecoder::prefill(&model, &prompts, steps).unwrap();
    let mut seqs = prompts.clone();
    let mut handed_back: Option<*const f32> = None;
    for step in 0..=steps {
        let got = logits.into_data().try_into_vec::<f32>().unwrap();
        if let Some(buffer) = handed_back
            && llama_model::decode_projection::PackedVocab::supported()
        {
            assert_eq!(got.as_ptr(), buffer, "step {step}: the logits are not in the buffer handed back");
        }
        for (row, seq) in seqs.iter().enumerate() {
            let full = host(model.forward(ids(std::slice::from_ref(seq), &device)));
            let want = &full[(seq.len() - 1) * 60..seq.len() * 60];
            let diff = max_abs_diff(&got[row * 60..(row + 1) * 60], want);
            assert!(diff < 1e-4, "step {step} row {row}: cached vs full differ by {diff}");
        }
        if step == steps {
            break;
        }
        let next: Vec<u32> = (0..3).map(|r| ((step * 7 + r * 13) % 60) as u32).collect();
        for (s, &n) in seqs.iter_mut().zip(&next) {
            s.push(n);
        }
        handed_back = Some(got.as_ptr());
        decoder.recycle(got);
        logits = decoder.step(&next);
    }
}

#[test]
fn generation_is_seeded_stops_per_row_and_returns_model_logprobs() {
    let device = Device::flex();
    let model = tiny(60, 2).init(&device);
    let prompts = vec![vec![1u32, 5, 9], vec![1, 22, 33, 44, 55, 6, 7]];
    let sampling = SamplingConfig { temperature: 1.0, top_k: Some(20), top_p: Some(0.95), max_new_tokens: 6, eos_id: None, seed: 3, logprobs: true };
    let a = generate(&model, &prompts, &sampling).unwrap();
    let b = generate(&model, &prompts, &sampling).unwrap();
    assert_eq!(a, b, "same seed, same output");
    let c = generate(&model, &prompts, &SamplingConfig { seed: 4, ..sampling.clone() }).unwrap();
    assert_ne!(a.tokens, c.tokens, "another seed, another sample");
    assert!(a.tokens.iter().all(|t| t.len() == 6));
    // Log-probabilities equal those of a full forward pass over prompt + generated tokens.
    for (row, prompt) in prompts.iter().enumerate() {
        assert_eq!(a.logprobs[row].len(), a.tokens[row].len(), "one log-prob per token");
        let seq: Vec<u32> = prompt.iter().chain(&a.tokens[row]).copied().collect();
        let full = host(model.forward(ids(std::slice::from_ref(&seq), &device)));
        for (i, (&tok, &lp)) in a.tokens[row].iter().zip(&a.logprobs[row]).enumerate() {
            let pos = prompt.len() - 1 + i;
            let want = log_softmax_at(&full[pos * 60..(pos + 1) * 60], tok as usize);
            assert!((want - lp).abs() < 1e-4, "row {row} token {i}: {lp} vs {want}");
        }
    }
    // Stop on EOS per row: make row 0's first greedy token the EOS.
    let greedy = generate(&model, &prompts, &SamplingConfig { eos_id: None, ..SamplingConfig::greedy(4) }).unwrap();
    let eos = greedy.tokens[0][0];
    let stopped = generate(&model, &prompts, &SamplingConfig { eos_id: Some(eos), ..SamplingConfig::greedy(4) }).unwrap();
    assert_eq!(stopped.tokens[0], vec![eos]);
    assert!(stopped.stopped_on_eos[0]);
    let row1_until_eos: Vec<u32> = greedy.tokens[1].iter().copied().take_while(|&t| t != eos).collect();
    assert!(stopped.tokens[1].starts_with(&row1_until_eos));
}

/// Continuous batching: 7 prompts of 1 to 8 tokens through 3 slots, each row stopped after its
/// own number of tokens (2 to 9), so that slots take new prompts at different steps and decode
/// at different positions, give each row what it gets alone with its seed: the same tokens and
/// log-probs within 1e-4.
#[test]
fn continuous_batching_gives_each_row_what_it_gets_alone() {
    let device = Device::flex();
    let model = tiny(60, 2).init(&device);
    let prompts: Vec<Vec<u32>> = (0..7).map(|i| (0..1 + (i * 3) % 8).map(|j| ((1 + i * 11 + j * 7) % 60) as u32).collect()).collect();
    let sampling = SamplingConfig { temperature: 1.0, top_k: None, top_p: None, max_new_tokens: 9, eos_id: None, seed: 5, logprobs: true };
    let seeds: Vec<u64> = (0..7).map(|i| row_seed(5, i)).collect();
    let budget = |row: usize| 2 + (row * 5) % 8;
    let mut streamed = [0; 7];
    let together = generate_in_slots(&model, &prompts, &sampling, &seeds, 3, |row, _| streamed[row] += 1, |row, t| t.len() >= budget(row)).unwrap();
    for (row, prompt) in prompts.iter().enumerate() {
        let alone = generate_until(&model, std::slice::from_ref(prompt), &sampling, &seeds[row..row + 1], |_, _| {}, |_, t| t.len() >= budget(row)).unwrap();
        assert_eq!((together.tokens[row].len(), streamed[row]), (budget(row), budget(row)), "row {row}");
        assert_eq!(together.tokens[row], alone.tokens[0], "row {row}");
        assert_eq!(together.logprobs[row].len(), budget(row), "row {row}: one log-prob per token");
        let diff = max_abs_diff(&together.logprobs[row], &alone.logprobs[0]);
        assert!(diff < 1e-4, "row {row}: log-probs differ by {diff}");
    }
}

#[test]
fn generation_rejects_bad_prompts() {
    let device = Device::flex();
    let model = tiny(60, 2).init(&device);
    let greedy = SamplingConfig::greedy(4);
    assert!(generate(&model, &[], &greedy).unwrap_err().to_string().contains("no prompts"));
    assert!(generate(&model, &[vec![]], &greedy).unwrap_err().to_string().contains("empty"));
    assert!(generate(&model, &[vec![1, 60]], &greedy).unwrap_err().to_string().contains("outside the vocabulary"));
    let long = SamplingConfig::greedy(100);
    assert!(generate(&model, &[vec![1]], &long).unwrap_err().to_string().contains("max_seq_len"));
}

/// The fused CPU kernels (cross-entropy, attention, RoPE, SwiGLU, RMSNorm) give the loss and
/// every parameter's gradient that Burn's composed ops give, on a model with grouped-query
/// attention and sequences longer than one attention block.
#[test]
fn fused_kernels_equal_composed_ops_on_the_whole_model() {
    let device = Device::flex().autodiff();
    device.seed(21);
    let config = LlamaConfig::new(32, 2, 4).with_n_kv_heads(2).with_vocab_size(50).with_multiple_of(16).with_max_seq_len(160);
    let model = config.init(&device);
    let (b, t) = (2, 150);
    let tokens: Vec<u32> = (0..b * (t + 1)).map(|i| (i * 7 + i / 13) as u32 % 50).collect();
    let rows: Vec<Vec<u32>> = tokens.chunks(t + 1).map(|r| r[..t].to_vec()).collect();
    let targets: Vec<i64> = tokens.chunks(t + 1).flat_map(|r| r[1..].iter().map(|&x| x as i64)).collect();
    let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [b * t]), &device);
    let run = || {
        let logits = model.forward(ids(&rows, &device));
        let loss = llama_model::loss::token_nll(logits.reshape([b * t, 50]), targets.clone()).mean();
        let grads = burn::optim::GradientsParams::from_grads(loss.backward(), &model);
        (loss.into_scalar::<f32>(), all_grads(&model, &grads))
    };
    let (fused_loss, fused) = run();
    let (composed_loss, composed) = llama_model::without_fused_kernels(run);
    assert!((fused_loss - composed_loss).abs() < 1e-5, "loss: fused {fused_loss} vs composed {composed_loss}");
    assert_eq!(fused.len(), composed.len());
    for (i, ((shape, f), (_, c))) in fused.iter().zip(&composed).enumerate() {
        assert!(!c.is_empty() && c.iter().any(|g| g.abs() > 1e-6), "parameter {i} {shape}: no reference gradient");
        let scale = c.iter().fold(0f32, |m, g| m.max(g.abs()));
        let diff = max_abs_diff(f, c);
        assert!(diff <= 1e-4 * scale.max(1e-3), "parameter {i} {shape}: gradients differ by {diff} (largest {scale})");
    }
}

/// Asserts that two gradient lists agree parameter by parameter to `tol` relative to each
/// parameter's largest reference gradient, and that every reference gradient is non-zero.
fn assert_same_grads(what: &str, got: &[(String, Vec<f32>)], want: &[(String, Vec<f32>)], tol: f32) {
    for (parameter, deviation) in gradient_deviations(got, want) {
        assert!(deviation <= tol, "{what}: {parameter}: gradients differ by {deviation} of the largest reference gradient (infinite: none)");
    }
}

/// Block recomputation (with and without chunked logits) gives the loss and every parameter's
/// gradient of the plain pass on a GQA model: with the fused CPU kernels and with Burn's
/// composed ops (the GPU path), in f32 to 1e-5; in bf16, recomputing gives the bf16 pass's
/// gradients (f32 master gradients through the casts) to a few bf16 rounding steps.
#[test]
fn block_recomputation_gives_the_plain_gradients() {
    use llama_model::Precision;
    let device = Device::flex().autodiff();
    let (model, rows, targets) = gqa_batch(&device, 60);
    let block = MemorySaving { recompute_blocks: true, logits_chunk: None };
    let block_chunked = MemorySaving { recompute_blocks: true, logits_chunk: Some(48) };
    for fused in [true, false] {
        let run = |precision, saving| {
            let go = || loss_and_grads(&model, &rows, &targets, precision, saving);
            if fused { go() } else { llama_model::without_fused_kernels(go) }
        };
        let (plain_loss, plain) = run(Precision::F32, MemorySaving::default());
        for (name, saving, segments) in [("block", block, 3), ("block + chunks", block_chunked, 3 + 4)] {
            let before = llama_model::recompute::reruns();
            let (loss, grads) = run(Precision::F32, saving);
            // 3 blocks, and 160 positions in chunks of 48: 4 chunks (tests run in parallel, so at least).
            assert!(llama_model::recompute::reruns() - before >= segments, "{name}: nothing was recomputed");
            assert!((loss - plain_loss).abs() < 1e-5, "{name} (fused {fused}): loss {loss} vs {plain_loss}");
            assert_same_grads(&format!("{name}, f32, fused {fused}"), &grads, &plain, 1e-5);
        }
        let (bf16_loss, bf16) = run(Precision::Bf16, MemorySaving::default());
        let (loss, grads) = run(Precision::Bf16, block);
        assert!((loss - bf16_loss).abs() < 1e-3 * bf16_loss.abs(), "bf16 (fused {fused}): loss {loss} vs {bf16_loss}");
        // A few bf16 rounding steps (2^-8 to 2^-7 each) of the largest gradient apart: the re-run
        // sums the gradients of a tensor's several uses in another order, and bf16 sums round.
        assert_same_grads(&format!("block, bf16, fused {fused}"), &grads, &bf16, 5e-2);
    }
}

/// The chunked output projection + cross-entropy equals the whole-logits one in value and in
/// every parameter's gradient, for chunks that divide the positions and ones that do not, and
/// with tied embeddings (the chunk's weight is the embedding matrix).
#[test]
fn chunked_logits_equal_whole_logits() {
    let device = Device::flex().autodiff();
    let (model, rows, targets) = gqa_batch(&device, 70);
    let tied = LlamaConfig::new(32, 2, 4).with_vocab_size(70).with_multiple_of(16).with_max_seq_len(96).with_tie_word_embeddings(true).init(&device);
    for (name, model) in [("untied", &model), ("tied", &tied)] {
        let (whole_loss, whole) = loss_and_grads(model, &rows, &targets, llama_model::Precision::F32, MemorySaving::default());
        for chunk in [1, 40, 77, 160, 1000] {
            let saving = MemorySaving { recompute_blocks: false, logits_chunk: Some(chunk) };
            let (loss, grads) = loss_and_grads(model, &rows, &targets, llama_model::Precision::F32, saving);
            assert!((loss - whole_loss).abs() < 1e-5, "{name}, chunk {chunk}: loss {loss} vs {whole_loss}");
            assert_same_grads(&format!("{name}, chunk {chunk}"), &grads, &whole, 1e-5);
        }
    }
    // Per-position values too, and outside training (no autodiff) the whole logits are used.
    let plain = model.valid();
    let hidden = plain.forward_hidden(ids(&rows, &plain.device()), None);
    let whole = host(plain.token_nll(hidden.clone(), targets.clone().inner()));
    let chunks_of_33 = MemorySaving { recompute_blocks: false, logits_chunk: Some(33) };
    let chunked = with_memory_saving(chunks_of_33, || host(plain.token_nll(hidden.clone(), targets.inner())));
    assert_eq!(whole, chunked);
    // The entropy diagnostic, whole and by chunks, against -sum p log p from the logits.
    let logits = plain.forward(ids(&rows, &plain.device()));
    let [b, t, v] = logits.dims();
    let p = burn::tensor::activation::softmax(logits.reshape([b * t, v]), 1);
    let want = host((p.clone() * p.log()).sum_dim(1).reshape([b * t]).neg());
    for entropy in [host(plain.token_entropy(hidden.clone())), with_memory_saving(chunks_of_33, || host(plain.token_entropy(hidden.clone())))] {
        assert!(max_abs_diff(&entropy, &want) < 1e-4, "entropy differs by {}", max_abs_diff(&entropy, &want));
        assert!(want.iter().all(|&e| e > 0.1 && e <= (v as f32).ln() + 1e-4));
    }
}

/// With an extra attention mask (SFT's packed chats, reward padding) block recomputation gives
/// the plain gradients too: the mask is a constant of the re-run.
#[test]
fn block_recomputation_with_an_attention_mask() {
    use burn::tensor::Bool;
    let device = Device::flex().autodiff();
    let (model, rows, targets) = gqa_batch(&device, 60);
    let (b, t) = (rows.len(), rows[0].len());
    // Two packed sequences per row: positions from 30 on do not see those before.
    let hide: Vec<bool> = (0..b * t * t).map(|i| (i / t % t >= 30) && (i % t < 30)).collect();
    let mask = Tensor::<3, Bool>::from_data(TensorData::new(hide, [b, t, t]), &device);
    let run = |saving| {
        let loss = with_memory_saving(saving, || model.token_nll(model.forward_hidden(ids(&rows, &device), Some(mask.clone())), targets.clone()).mean());
        let grads = burn::optim::GradientsParams::from_grads(loss.backward(), &model);
        all_grads(&model, &grads)
    };
    let plain = run(MemorySaving::default());
    let recomputed = run(MemorySaving { recompute_blocks: true, logits_chunk: Some(50) });
    assert_same_grads("block with a mask", &recomputed, &plain, 1e-5);
}

/// The same on a cubecl backend (`device::gpu_for_tests`: cuda, vulkan or wgpu; lavapipe runs
/// wgpu on a CPU): recomputation is routed to `Cube` and gives the plain pass's gradients. Built
/// only with a GPU feature.
#[cfg(any(feature = "vulkan", feature = "wgpu", feature = "cuda"))]
#[test]
fn block_recomputation_on_gpu() {
    let spec = llama_model::device::gpu_for_tests().unwrap();
    for d in llama_model::device_check::block_recomputation(&spec).unwrap() {
        assert!(d.passed(), "{d}");
    }
}
