//! RLHF: generator vs trainer log-probs, PPO's losses by hand, resume and crash equality, the
//! shipped config (bad input to the binary: `bad_input.rs`; prompt sets: `llama-data`'s tests).

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use llama_data::prompts::load_prompts;
use llama_model::LlamaConfig;
use llama_model::generate::{SamplingConfig, generate};
use llama_reward::RewardModel;
use llama_reward::scoring::full_sequence;
use llama_rlhf::{RlhfConfig, token_logprobs, validate};

fn repo() -> PathBuf {
    Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("run under cargo")).join("../..")
}

fn tiny(vocab: usize) -> LlamaConfig {
    LlamaConfig::new(32, 2, 4).with_n_kv_heads(2).with_vocab_size(vocab).with_multiple_of(16).with_max_seq_len(128)
}

/// The bug class that broke other RLHF systems: the trainer's log-prob of a sampled token must be
/// the one the generator returned, for rows of different prompt and response lengths.
#[test]
fn trainer_logprobs_equal_generator_logprobs() {
    let device = Device::flex();
    let model = tiny(60).init(&device);
    let prompts = vec![vec![1u32, 5, 9], vec![1, 22, 33, 44, 55, 6, 7], vec![1, 8]];
    let sampling = SamplingConfig { temperature: 1.0, top_k: None, top_p: None, max_new_tokens: 7, eos_id: Some(2), seed: 11, logprobs: true };
    let out = generate(&model, &prompts, &sampling).unwrap();
    let seqs: Vec<Vec<u32>> = prompts.iter().zip(&out.tokens).map(|(p, r)| full_sequence(p, r, 2)).collect();
    let lp = token_logprobs(&model, &seqs, 0).into_data().try_to_vec::<f32>().unwrap();
    let width = seqs.iter().map(Vec::len).max().unwrap() - 1;
    for (i, p) in prompts.iter().enumerate() {
        assert_eq!(out.logprobs[i].len(), out.tokens[i].len(), "row {i}: one log-prob per token");
        for (j, &g) in out.logprobs[i].iter().enumerate() {
            let t = lp[i * width + p.len() - 1 + j];
            assert!((t - g).abs() < 1e-4, "row {i} token {j}: trainer {t} vs generator {g}");
        }
    }
}

/// A policy directory and two reward model run directories of random tiny models.
/// A random policy and two reward models, the same on every run (tolerances such as bf16's
/// against f32's are then checked once, not drawn anew each time).
fn models(dir: &Path, vocab: usize, rm_vocab: usize) -> (PathBuf, PathBuf, PathBuf) {
    let device = Device::flex();
    let policy_dir = dir.join("policy");
    llama_model::checkpoint::save_native(&llama_testkit::deterministic(tiny(vocab).init(&device), 1), &tiny(vocab), &policy_dir).unwrap();
    let mut rms = vec![];
    for (seed, name) in [(2, "help"), (3, "safe")] {
        let d = dir.join(name);
        let model = llama_testkit::deterministic(RewardModel::new(&tiny(rm_vocab), &device), seed);
        llama_reward::save_reward_model(&model, &tiny(rm_vocab), &d).unwrap();
        rms.push(d);
    }
    (policy_dir, rms[0].clone(), rms[1].clone())
}

fn config(dir: &Path, policy: &Path, help: &Path, safe: &Path, extra: &str) -> PathBuf {
    let text = format!(
        "policy = \"{}\"\nhelpfulness_model = \"{}\"\nsafety_model = \"{}\"\n[data]\ntokenizer = \"{}\"\nprompts = \"{}\"\neval_prompts = \"{}\"\n{extra}\n",
        policy.display(),
        help.display(),
        safe.display(),
        repo().join("data/tokenizer.json").display(),
        repo().join("data/rlhf/prompts.jsonl").display(),
        repo().join("data/rlhf/eval_prompts.jsonl").display(),
    );
    let path = dir.join("rlhf.toml");
    std::fs::write(&path, text).unwrap();
    path
}

const PPO: &str = "[rejection_sampling]\nrounds = 0\n[ppo]\niterations = 4\nbatch_size = 4\nminibatch_size = 2\nmax_new_tokens = 6\nlr = 1e-3\neval_every = 100\ncheckpoint_every = 100\n";

fn ppo_curve(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out.join("ppo/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("ppo/policy_loss").is_some())
        .map(|v| format!("{} {} {} {}", v["step"], v["ppo/policy_loss"], v["ppo/value_loss"], v["ppo/reward_whitened"]))
        .collect()
}

/// PPO interrupted after iteration 2 and resumed gives the same metrics as an uninterrupted run.
#[test]
fn ppo_resume_equals_uninterrupted() {
    let tmp = tempfile::tempdir().unwrap();
    let (policy, help, safe) = models(tmp.path(), 2048, 2048);
    let cfg = config(tmp.path(), &policy, &help, &safe, PPO);
    llama_rlhf::run(&cfg, &llama_rlhf::RunOptions { skip_rejection_sampling: true, ..llama_rlhf::RunOptions::with_out(tmp.path().join("a")) }).unwrap();
    let want = ppo_curve(&tmp.path().join("a"));
    assert_eq!(want.len(), 4);
    llama_rlhf::run(
        &cfg,
        &llama_rlhf::RunOptions { stop_after: Some(2), skip_rejection_sampling: true, ..llama_rlhf::RunOptions::with_out(tmp.path().join("b")) },
    )
    .unwrap();
    llama_rlhf::run(&cfg, &llama_rlhf::RunOptions { resume: true, skip_rejection_sampling: true, ..llama_rlhf::RunOptions::with_out(tmp.path().join("b")) })
        .unwrap();
    assert_eq!(ppo_curve(&tmp.path().join("b")), want);
}

/// `run.optimizer = "host"` reaches PPO: the policy and value masters and their AdamWs on the
/// host (the flat state, updated in place), the passes on copies. On the CPU both are flex, so
/// the metrics equal the device optimizer's exactly, in f32 and in bf16; a host run stopped after
/// iteration 2 resumes with the device optimizer to the same metrics.
#[test]
fn ppo_with_the_host_optimizer_equals_the_device_optimizer() {
    let tmp = tempfile::tempdir().unwrap();
    let (policy, help, safe) = models(tmp.path(), 2048, 2048);
    let device_cfg = config(tmp.path(), &policy, &help, &safe, PPO);
    let options = |out: &str| llama_rlhf::RunOptions { skip_rejection_sampling: true, ..llama_rlhf::RunOptions::with_out(tmp.path().join(out)) };
    llama_rlhf::run(&device_cfg, &options("device")).unwrap();
    let want = ppo_curve(&tmp.path().join("device"));
    assert_eq!(want.len(), 4);
    let host_dir = tmp.path().join("host-config");
    std::fs::create_dir_all(&host_dir).unwrap();
    let host_cfg = config(&host_dir, &policy, &help, &safe, &format!("{PPO}[run]\noptimizer = \"host\"\n"));
    llama_rlhf::run(&host_cfg, &options("host")).unwrap();
    assert_eq!(ppo_curve(&tmp.path().join("host")), want);
    let state = tmp.path().join("host/ppo/checkpoints/step-00000004/policy_optimizer/optimizer/manifest.json");
    assert!(state.is_file(), "{} is missing: the host run did not keep the flat AdamW state", state.display());
    llama_rlhf::run(&host_cfg, &llama_rlhf::RunOptions { stop_after: Some(2), ..options("switch") }).unwrap();
    llama_rlhf::run(&device_cfg, &llama_rlhf::RunOptions { resume: true, ..options("switch") }).unwrap();
    assert_eq!(ppo_curve(&tmp.path().join("switch")), want);
    // In bf16 the host run's passes reuse the copies its updates wrote (a stale copy would part
    // the curves); they hold the device run's tracked casts exactly.
    let bf16 = |name: &str, run: &str| {
        let dir = tmp.path().join(format!("{name}-config"));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = config(&dir, &policy, &help, &safe, &format!("{PPO}[run]\ndtype = \"bf16\"\n{run}"));
        llama_rlhf::run(&cfg, &options(name)).unwrap();
        ppo_curve(&tmp.path().join(name))
    };
    let want = bf16("bf16-device", "");
    assert_eq!(want.len(), 4);
    assert_eq!(bf16("bf16-host", "optimizer = \"host\"\n"), want);
}

/// `run.dtype = "bf16"`: the frozen models are held in bf16 and the policy's and value model's
/// passes run in it, their masters f32. Four PPO iterations track the f32 run within bf16's
/// rounding.
#[test]
fn ppo_in_bf16_tracks_the_f32_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (policy, help, safe) = models(tmp.path(), 2048, 2048);
    let options = |out: &str| llama_rlhf::RunOptions { skip_rejection_sampling: true, ..llama_rlhf::RunOptions::with_out(tmp.path().join(out)) };
    let f32_cfg = config(tmp.path(), &policy, &help, &safe, PPO);
    llama_rlhf::run(&f32_cfg, &options("f32")).unwrap();
    let bf16_dir = tmp.path().join("bf16-config");
    std::fs::create_dir_all(&bf16_dir).unwrap();
    let bf16_cfg = config(&bf16_dir, &policy, &help, &safe, &format!("{PPO}[run]\ndtype = \"bf16\"\n"));
    llama_rlhf::run(&bf16_cfg, &options("bf16")).unwrap();
    let metrics = |out: &str, key: &str| all_values(&tmp.path().join(out).join("ppo/metrics.jsonl"), key);
    // The reference and the policy's passes in the same dtype, the old log-probs teacher-forced:
    // before any update the policy is its reference exactly.
    assert_eq!(metrics("bf16", "ppo/kl_k1")[0], 0.0);
    assert_ne!(metrics("f32", "ppo/value_loss"), metrics("bf16", "ppo/value_loss"), "the bf16 run computed in f32");
    // (key, relative tolerance, absolute tolerance): the rollouts' rewards, entropy and lengths
    // within bf16's rounding of f32's (a sampled token can flip, so the losses of later
    // iterations part; the first iteration's value loss is compared below).
    for (key, rel, abs) in [("ppo/reward_combined", 0.0, 1e-3), ("ppo/entropy", 1e-3, 0.0), ("ppo/response_length", 0.0, 0.0)] {
        let (want, got) = (metrics("f32", key), metrics("bf16", key));
        assert_eq!(want.len(), 4, "{key}: {want:?}");
        assert_eq!(want.len(), got.len(), "{key}: {want:?} vs {got:?}");
        for (a, b) in want.iter().zip(&got) {
            assert!((a - b).abs() <= rel * a.abs() + abs, "{key}: f32 {a} vs bf16 {b} ({want:?} vs {got:?})");
        }
    }
    let (want, got) = (metrics("f32", "ppo/value_loss")[0], metrics("bf16", "ppo/value_loss")[0]);
    assert!((want - got).abs() <= 0.1 * want, "first value loss: f32 {want} vs bf16 {got}");
    // The bf16 passes' gradients reach the f32 masters: the policy and the value model move
    // about as far as in f32 (the largest change of any weight within a factor of 3).
    let moved = |out: &str, model: &str| {
        let dir = tmp.path().join(out).join("ppo/checkpoints/step-00000004");
        let (start, end): (Vec<f32>, Vec<f32>) = if model == "policy" {
            (
                floats(&llama_trainer::checkpoint::init_model(&policy, &Device::flex()).unwrap().1),
                floats(&llama_trainer::checkpoint::init_model(&dir, &Device::flex()).unwrap().1),
            )
        } else {
            let load = |path: &Path| {
                let mut m = RewardModel::new(&tiny(2048), &Device::flex());
                llama_model::checkpoint::load_weights(&mut m, path).unwrap();
                floats(&m)
            };
            (load(&help.join("model.bpk")), load(&dir.join("value.bpk")))
        };
        start.iter().zip(&end).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max)
    };
    for model in ["policy", "value"] {
        let (want, got) = (moved("f32", model), moved("bf16", model));
        assert!(want > 0.0 && got > want / 3.0 && got < want * 3.0, "{model} moved {want} in f32, {got} in bf16");
    }
}

/// PPO's clipped losses and their gradients against hand-computed values: clipping on both sides
/// of the ratio and of the value, positive and negative advantages, a masked position.
#[test]
fn clipped_policy_and_value_losses_equal_hand_computed_values() {
    use burn::tensor::{Tensor, TensorData};
    let device = Device::flex().autodiff();
    let t = |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v.clone(), [1, v.len()]), &device);
    let host = |x: Tensor<2>| x.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    let close = |got: &[f32], want: &[f32]| got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-5) && got.len() == want.len();

    // Ratios 1.5 (A = 1: clipped at 1.2), 0.5 (A = 1: below the range, unclipped), 1.1 (A = -2:
    // inside it), 0.5 (A = -1: clipped at 0.8), and a masked 9.0.
    let ratios = [1.5f32, 0.5, 1.1, 0.5, 9.0];
    let old_lp: Vec<f32> = vec![-1.0, -2.0, -0.5, -3.0, -1.0];
    let lp = t(old_lp.iter().zip(ratios).map(|(o, r)| o + r.ln()).collect()).require_grad();
    let (adv, mask) = (t(vec![1.0, 1.0, -2.0, -1.0, 5.0]), t(vec![1.0, 1.0, 1.0, 1.0, 0.0]));
    let loss = llama_rlhf::clipped_policy_loss(lp.clone(), t(old_lp), adv, mask, 0.2);
    // (-1.2 - 0.5 + 2.2 + 0.8) / 4
    assert!((loss.clone().into_scalar::<f32>() - 0.325).abs() < 1e-5);
    // d/d lp of -A r / 4 where the unclipped term is the larger; 0 where the clipped one is.
    let grad = host(lp.grad(&loss.backward()).unwrap());
    assert!(close(&grad, &[0.0, -0.125, 0.55, 0.0, 0.0]), "{grad:?}");

    // Values 1.0 from 0.5 towards a return of 2.0 (the clipped 0.7 is further: it counts, flat),
    // 0.0 from 0.5 for a return of 0.6 (the unclipped one is further), and a masked 5.0.
    let values = t(vec![1.0, 0.0, 5.0]).require_grad();
    let loss = llama_rlhf::clipped_value_loss(values.clone(), t(vec![0.5, 0.5, 0.0]), t(vec![2.0, 0.6, 0.0]), t(vec![1.0, 1.0, 0.0]), 0.2);
    // 0.5 * (1.3^2 + 0.6^2) / 2
    assert!((loss.clone().into_scalar::<f32>() - 0.5125).abs() < 1e-5);
    let grad = host(values.grad(&loss.backward()).unwrap());
    assert!(close(&grad, &[0.0, -0.3, 0.0]), "{grad:?}");
}

/// `ppo.weight_decay` reaches the optimizers: from the same first rollout, the same run without it
/// logs other losses once decayed weights are used.
#[test]
fn ppo_weight_decay_is_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let (policy, help, safe) = models(tmp.path(), 2048, 2048);
    let run = |name: &str, decay: f64| {
        let cfg = config(tmp.path(), &policy, &help, &safe, &PPO.replace("iterations = 4", &format!("iterations = 2\nweight_decay = {decay}")));
        llama_rlhf::run(&cfg, &llama_rlhf::RunOptions { skip_rejection_sampling: true, ..llama_rlhf::RunOptions::with_out(tmp.path().join(name)) }).unwrap();
        ppo_curve(&tmp.path().join(name))
    };
    let (with, without) = (run("decay", 0.1), run("none", 0.0));
    let reward = |row: &str| row.split(' ').nth(3).unwrap().to_string();
    assert_eq!(reward(&with[0]), reward(&without[0]), "iteration 1's rollout comes from the same starting weights");
    assert_ne!(with, without, "weight decay changed nothing");
}

/// The `rlhf` binary on `cfg` into `out` with `extra` flags, killed at `kill` (a
/// `LLAMA2_TEST_KILL_AT` point) or signalled at `signal` (`LLAMA2_TEST_SIGNAL_AT`) when given.
fn run_rlhf(cfg: &Path, out: &Path, extra: &[&str], kill: Option<&str>, signal: Option<&str>) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_rlhf"));
    cmd.args(["--config", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()]).args(extra);
    if let Some(point) = kill {
        cmd.env("LLAMA2_TEST_KILL_AT", point);
    }
    if let Some(point) = signal {
        cmd.env("LLAMA2_TEST_SIGNAL_AT", point);
    }
    cmd.output().unwrap()
}

/// The crash test of PPO's own loop: killed with SIGKILL after an iteration's updates, after its
/// logging, and at every point of a checkpoint write (`trainer::test_hooks::KILL_AT_ENV`),
/// `rlhf --resume` ends with the uninterrupted run's metrics, each iteration logged once.
#[test]
fn ppo_killed_anywhere_resumes_to_the_uninterrupted_run() {
    use std::os::unix::process::ExitStatusExt;
    let tmp = tempfile::tempdir().unwrap();
    let (policy, help, safe) = models(tmp.path(), 2048, 2048);
    // A checkpoint every iteration, two kept: the save of iteration 3 prunes iteration 1's.
    let cfg = config(tmp.path(), &policy, &help, &safe, &PPO.replace("checkpoint_every = 100", "checkpoint_every = 1"));
    llama_rlhf::run(&cfg, &llama_rlhf::RunOptions { skip_rejection_sampling: true, ..llama_rlhf::RunOptions::with_out(tmp.path().join("straight")) }).unwrap();
    let want = ppo_curve(&tmp.path().join("straight"));
    // PPO's best policy is a model directory with the tokenizer it was trained with.
    assert!(tmp.path().join("straight/ppo/best/tokenizer.json").is_file(), "ppo/best carries its tokenizer");
    // ppo.keep_checkpoints (2 by default) newest kept; each a model directory whose policy
    // weights are written once (model.bpk), loadable as a model.
    let kept: Vec<u64> = llama_model::checkpoint::list_checkpoints(&tmp.path().join("straight/ppo/checkpoints")).into_iter().map(|(s, _)| s).collect();
    assert_eq!(kept, vec![3, 4]);
    let newest = tmp.path().join("straight/ppo/checkpoints/step-00000004");
    let files: Vec<String> = std::fs::read_dir(&newest).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(files.iter().filter(|f| f.ends_with(".bpk")).count(), 4, "model, value and two optimizers: {files:?}");
    llama_model::checkpoint::load(&newest, &Device::flex()).unwrap();
    let rlhf = |out: &Path, extra: &[&str], kill: Option<&str>| run_rlhf(&cfg, out, &[&["--skip-rejection-sampling"], extra].concat(), kill, None);
    for (i, point) in ["update@2", "logged@2", "model.bpk@2", "ppo_state.json@2", "synced@2", "published@2", "pruning@3"].iter().enumerate() {
        let out = tmp.path().join(format!("killed{i}"));
        let died = rlhf(&out, &[], Some(point));
        assert_eq!(died.status.signal(), Some(9), "{point}: PPO should die by SIGKILL: {}", String::from_utf8_lossy(&died.stderr));
        let resumed = rlhf(&out, &["--resume"], None);
        assert!(resumed.status.success(), "{point}: {}", String::from_utf8_lossy(&resumed.stderr));
        assert_eq!(ppo_curve(&out), want, "{point}: the resumed run's metrics differ");
    }
    // SIGTERM mid-iteration (after its updates): iteration 2 is saved, the run exits 0, and the
    // resume gives the uninterrupted run.
    let out = tmp.path().join("signalled");
    let ended = run_rlhf(&cfg, &out, &["--skip-rejection-sampling"], None, Some("update@2"));
    let stdout = String::from_utf8_lossy(&ended.stdout);
    assert!(ended.status.success(), "{}", String::from_utf8_lossy(&ended.stderr));
    assert!(stdout.contains("SIGTERM received: stopped after PPO iteration 2"), "{stdout}");
    let resumed = rlhf(&out, &["--resume"], None);
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    assert_eq!(ppo_curve(&out), want, "signalled: the resumed run's metrics differ");
}

/// Rejection sampling killed in round 1's fine-tuning, or right after round 1 was recorded, and
/// `rlhf --resume`d, ends with the uninterrupted run's pools, RS metrics and PPO metrics.
#[test]
fn rejection_sampling_killed_in_a_round_resumes_there() {
    use std::os::unix::process::ExitStatusExt;
    let tmp = tempfile::tempdir().unwrap();
    let (policy, help, safe) = models(tmp.path(), 2048, 2048);
    let extra = "[rejection_sampling]\nrounds = 2\nk = 2\nmax_new_tokens = 4\nsft_steps = 2\nlr = 1e-2\nbatch_size = 4\nseq_len = 64\n[ppo]\niterations = 1\nbatch_size = 4\nminibatch_size = 2\nmax_new_tokens = 4\neval_every = 100\ncheckpoint_every = 100\n";
    let cfg = config(tmp.path(), &policy, &help, &safe, extra);
    let rlhf = |out: &Path, extra: &[&str], kill: Option<&str>| run_rlhf(&cfg, out, extra, kill, None);
    let outcome = |out: &Path| {
        let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        (read("rejection-sampling/pool-round-1.jsonl"), read("rejection-sampling/pool-round-2.jsonl"), read("rejection-sampling/metrics.jsonl"), ppo_curve(out))
    };
    let straight = tmp.path().join("straight");
    assert!(rlhf(&straight, &[], None).status.success());
    let want = outcome(&straight);
    assert_eq!(want.2.lines().filter(|l| l.contains("rs/eval_reward")).count(), 3, "start + 2 rounds");
    // `update@1`: round 1's first fine-tuning step; `round@1`: round 1 recorded, round 2 not begun.
    for point in ["update@1", "round@1"] {
        let out = tmp.path().join(point.replace('@', "-"));
        let died = rlhf(&out, &[], Some(point));
        assert_eq!(died.status.signal(), Some(9), "{point}: should die by SIGKILL: {}", String::from_utf8_lossy(&died.stderr));
        let resumed = rlhf(&out, &["--resume"], None);
        assert!(resumed.status.success(), "{point}: {}", String::from_utf8_lossy(&resumed.stderr));
        if point == "round@1" {
            assert!(String::from_utf8_lossy(&resumed.stdout).contains("resumed after round 1 of 2"), "{point}");
        }
        assert_eq!(outcome(&out), want, "{point}: the resumed run differs from the uninterrupted one");
    }
    // SIGINT in round 1's fine-tuning (the trainer saves its step and the run ends), or SIGTERM
    // once round 1 is recorded: exit 0, and the resume gives the uninterrupted run.
    for (point, line) in
        [("SIGINT:backward@1", "SIGINT received: stopped after step 1"), ("round@1", "SIGTERM received: stopped after rejection-sampling round 1")]
    {
        let out = tmp.path().join(format!("signalled-{}", point.replace(['@', ':'], "-")));
        let ended = run_rlhf(&cfg, &out, &[], None, Some(point));
        let stdout = String::from_utf8_lossy(&ended.stdout);
        assert!(ended.status.success(), "{point}: {}", String::from_utf8_lossy(&ended.stderr));
        assert!(stdout.contains(line), "{point}: {stdout}");
        let resumed = rlhf(&out, &["--resume"], None);
        assert!(resumed.status.success(), "{point}: {}", String::from_utf8_lossy(&resumed.stderr));
        assert_eq!(outcome(&out), want, "{point}: the resumed run differs from the uninterrupted one");
    }
}

fn last_value(metrics: &Path, key: &str) -> f64 {
    *all_values(metrics, key).last().unwrap_or_else(|| panic!("{key} not logged"))
}

/// With `include_greedy`, the policy's greedy answer competes with the K samples, so the kept
/// pool's mean reward is at least both the greedy answers' mean and the best-of-K mean.
#[test]
fn rejection_sampling_pool_is_never_worse_than_greedy_or_best_of_k() {
    let tmp = tempfile::tempdir().unwrap();
    let (policy, help, safe) = models(tmp.path(), 2048, 2048);
    let extra = "[rejection_sampling]\nrounds = 1\nk = 2\nmax_new_tokens = 4\nsft_steps = 1\nbatch_size = 4\nseq_len = 64\ninclude_greedy = true\n[ppo]\niterations = 1\nbatch_size = 4\nminibatch_size = 2\nmax_new_tokens = 4\neval_every = 100\ncheckpoint_every = 100\n";
    let cfg = config(tmp.path(), &policy, &help, &safe, extra);
    llama_rlhf::run(&cfg, &llama_rlhf::RunOptions::with_out(tmp.path().join("out"))).unwrap();
    let m = tmp.path().join("out/rejection-sampling/metrics.jsonl");
    let (pool, greedy, best) = (last_value(&m, "rs/pool_mean_reward"), last_value(&m, "rs/greedy_mean_reward"), last_value(&m, "rs/max_reward"));
    assert!(pool >= greedy - 1e-9 && pool >= best - 1e-9, "pool {pool}, greedy {greedy}, best of k {best}");
    // The pool is written as data: a row per prompt, its mean reward the logged one.
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(tmp.path().join("out/rejection-sampling/pool-round-1.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), load_prompts(&repo().join("data/rlhf/prompts.jsonl")).unwrap().len());
    let mean = rows.iter().map(|r| r["reward"].as_f64().unwrap()).sum::<f64>() / rows.len() as f64;
    assert!((mean - pool).abs() < 1e-9, "pool file mean {mean} vs logged {pool}");
    let with_fact: Vec<&serde_json::Value> = rows.iter().filter(|r| r.get("expected").is_some()).collect();
    let share = with_fact.iter().filter(|r| r["contains_expected"] == true).count() as f64 / with_fact.len() as f64;
    assert!((share - last_value(&m, "rs/pool_expected")).abs() < 1e-12);
}

/// With `[rejection_sampling.tools]` the samples and the held-out answers go through the tool
/// runtime; a policy that writes no call gets exactly the samples, rewards, pool and held-out
/// evaluation of plain generation (segment 0 of the runtime is `generate` with the same per-row
/// seeds). The runtime's calls: `llama-tools`' tests.
#[test]
fn rejection_sampling_with_tools_samples_as_plain_generation_when_no_call_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let (policy, help, safe) = models(tmp.path(), 2048, 2048);
    let rs = "[rejection_sampling]\nrounds = 1\nk = 2\nmax_new_tokens = 4\nsft_steps = 1\nbatch_size = 4\nseq_len = 64\ninclude_greedy = true\n";
    let ppo = "[ppo]\niterations = 1\nbatch_size = 4\nminibatch_size = 2\nmax_new_tokens = 4\neval_every = 100\ncheckpoint_every = 100\n";
    let tools = format!("[rejection_sampling.tools]\nsearch_corpus = \"{}\"\nmax_calls = 2\n", repo().join("data/tools/search.jsonl").display());
    let pools: Vec<(String, Vec<Vec<f64>>)> = [String::new(), tools]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let dir = tmp.path().join(format!("run-{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            let cfg = config(&dir, &policy, &help, &safe, &format!("{rs}{t}{ppo}"));
            llama_rlhf::run(&cfg, &llama_rlhf::RunOptions::with_out(dir.join("out"))).unwrap();
            let metrics = dir.join("out/rejection-sampling/metrics.jsonl");
            let held_out: Vec<Vec<f64>> = ["rs/eval_reward", "rs/eval_kl", "rs/eval_expected"].iter().map(|k| all_values(&metrics, k)).collect();
            (std::fs::read_to_string(dir.join("out/rejection-sampling/pool-round-1.jsonl")).unwrap(), held_out)
        })
        .collect();
    assert!(!pools[0].0.is_empty());
    assert_eq!(pools[0].0, pools[1].0);
    assert!(pools[0].1.iter().all(|v| v.len() == 2), "start and round 1: {:?}", pools[0].1);
    assert_eq!(pools[0].1, pools[1].1, "held-out evaluation with tools and without");
}

fn all_values(metrics: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get(key).and_then(|x| x.as_f64()))
        .collect()
}

/// With `keep_best_round`, PPO starts from the best of the starting policy and the RS rounds by
/// held-out reward: PPO's step-0 held-out reward is the maximum of the RS evaluations. (Also shows
/// that the held-out evaluation, sampled answers included, repeats exactly for the same policy.)
#[test]
fn keep_best_round_hands_ppo_the_best_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let (policy, help, safe) = models(tmp.path(), 2048, 2048);
    let extra = "[rejection_sampling]\nrounds = 2\nk = 2\nmax_new_tokens = 4\nsft_steps = 2\nlr = 1e-2\nbatch_size = 4\nseq_len = 64\nkeep_best_round = true\n[ppo]\niterations = 1\nbatch_size = 4\nminibatch_size = 2\nmax_new_tokens = 4\neval_every = 100\ncheckpoint_every = 100\n";
    let cfg = config(tmp.path(), &policy, &help, &safe, extra);
    llama_rlhf::run(&cfg, &llama_rlhf::RunOptions::with_out(tmp.path().join("out"))).unwrap();
    let rs = all_values(&tmp.path().join("out/rejection-sampling/metrics.jsonl"), "rs/eval_reward");
    assert_eq!(rs.len(), 3, "start + 2 rounds: {rs:?}");
    let best = rs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let ppo_start = all_values(&tmp.path().join("out/ppo/metrics.jsonl"), "ppo/eval_reward")[0];
    assert!((ppo_start - best).abs() < 1e-6, "PPO started at {ppo_start}, best RS evaluation {best} of {rs:?}");
    // The shipped held-out prompts give expected answers: their share is logged beside the reward.
    let expected = all_values(&tmp.path().join("out/rejection-sampling/metrics.jsonl"), "rs/eval_expected");
    assert!(expected.len() == 3 && expected.iter().all(|e| (0.0..=1.0).contains(e)), "{expected:?}");
}

/// Every float parameter of a module, flattened in visiting order.
struct Floats(Vec<f32>);

impl burn::module::ModuleVisitor for Floats {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<burn::tensor::Tensor<D>>) {
        self.0.extend(param.val().into_data().try_to_vec::<f32>().unwrap());
    }
}

fn floats<M: burn::module::Module>(module: &M) -> Vec<f32> {
    let mut v = Floats(vec![]);
    module.visit(&mut v);
    v.0
}

/// The value warm-up trains the value model alone: after `value_warmup` iterations the policy is
/// the start's, bit for bit, the value model has moved and no policy statistics were logged; after
/// the warm-up (here across a resume) the policy trains.
#[test]
fn value_warmup_freezes_the_policy_and_trains_the_value_model() {
    let device = Device::flex();
    let tmp = tempfile::tempdir().unwrap();
    let (policy, help, safe) = models(tmp.path(), 2048, 2048);
    let cfg = config(tmp.path(), &policy, &help, &safe, &format!("{PPO}value_warmup = 2\nvalue_lr = 1e-2\n"));
    let out = tmp.path().join("out");
    llama_rlhf::run(&cfg, &llama_rlhf::RunOptions { stop_after: Some(2), skip_rejection_sampling: true, ..llama_rlhf::RunOptions::with_out(out.clone()) })
        .unwrap();
    let start = floats(&llama_model::checkpoint::load(&policy, &device).unwrap().1);
    let warm = out.join("ppo/checkpoints/step-00000002");
    assert!(floats(&llama_model::checkpoint::load_native(&warm, &device).unwrap().1) == start, "the policy moved during the warm-up");
    let (rm_config, rm) = llama_reward::load_reward_model(&help, &device).unwrap();
    let mut value = RewardModel::new(&rm_config, &device);
    llama_model::checkpoint::load_weights(&mut value, &warm.join("value.bpk")).unwrap();
    let (v0, v1) = (floats(&rm), floats(&value));
    assert_eq!(v0.len(), v1.len());
    assert!(v0.iter().zip(&v1).any(|(a, b)| a != b), "the value model did not train during the warm-up");
    assert!(ppo_curve(&out).is_empty(), "policy statistics logged while the policy was frozen");
    assert_eq!(all_values(&out.join("ppo/metrics.jsonl"), "ppo/value_loss").len(), 2);

    llama_rlhf::run(&cfg, &llama_rlhf::RunOptions { resume: true, skip_rejection_sampling: true, ..llama_rlhf::RunOptions::with_out(out.clone()) }).unwrap();
    let trained = floats(&llama_model::checkpoint::load_native(&out.join("ppo/checkpoints/step-00000004"), &device).unwrap().1);
    assert!(trained.iter().zip(&start).any(|(a, b)| a != b), "the policy did not train after the warm-up");
    assert_eq!(ppo_curve(&out).iter().map(|l| l.split(' ').next().unwrap().to_string()).collect::<Vec<_>>(), ["3", "4"]);
}

/// The shipped tiny config parses (no unknown keys) and passes validation.
#[test]
fn shipped_config_is_valid() {
    for name in ["configs/rlhf-tiny.toml", "configs/rlhf-smollm2.toml"] {
        let cfg: RlhfConfig = llama_trainer::config::load_toml(&repo().join(name)).unwrap();
        validate(&cfg, name).unwrap();
        assert!(cfg.ppo.value_warmup < cfg.ppo.iterations && cfg.ppo.value_lr > 0.0, "{name}");
    }
}
