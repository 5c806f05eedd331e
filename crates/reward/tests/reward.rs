//! Reward models: the loss by hand for each margin preset, padding and neighbour invariance,
//! bad pair files, and tiny runs reaching high held-out accuracy on both shipped sets.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use llama_data::Tokenizer;
use llama_model::LlamaConfig;
use llama_reward::{Category, MarginPreset, Rating, RewardModel, load_pairs, ranking_loss_sum};

fn repo() -> PathBuf {
    Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("run under cargo")).join("../..")
}

fn t(v: &[f32]) -> Tensor<1> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), &Device::flex())
}

#[test]
fn ranking_loss_equals_hand_computed_values_for_every_margin_preset() {
    // Pairs: (r_chosen, r_rejected, rating) = (2.0, 1.0, significantly better), (0.5, 1.0, slightly better).
    let (chosen, rejected) = (t(&[2.0, 0.5]), t(&[1.0, 1.0]));
    let ratings = [Rating::SignificantlyBetter, Rating::SlightlyBetter];
    // -log sigmoid(x) = ln(1 + e^-x). By hand:
    //   none:  x = 1, -0.5        -> 0.3132617 + 0.9740770 = 1.2873387
    //   small: x = 0, -0.8333333  -> 0.6931472 + 1.1942211 = 1.8873683
    //   large: x = -2, -1.5       -> 2.1269280 + 1.7014133 = 3.8283413
    for (preset, want) in [(MarginPreset::None, 1.2873387), (MarginPreset::Small, 1.8873683), (MarginPreset::Large, 3.8283413)] {
        let margins: Vec<f32> = ratings.iter().map(|r| preset.margin(*r) as f32).collect();
        let got = ranking_loss_sum(chosen.clone(), rejected.clone(), t(&margins)).into_scalar::<f32>();
        assert!((got as f64 - want).abs() < 1e-5, "{preset:?}: {got} vs {want}");
    }
    assert_eq!(Rating::ALL.map(|r| MarginPreset::Large.margin(r)), [3.0, 2.0, 1.0, 0.0]);
    assert_eq!(Rating::ALL.map(|r| MarginPreset::Small.margin(r)), [1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0]);
}

#[test]
fn reward_ignores_right_padding_and_batch_neighbours() {
    let device = Device::flex();
    let config = LlamaConfig::new(32, 2, 4).with_n_kv_heads(2).with_vocab_size(50).with_multiple_of(16).with_max_seq_len(64);
    let mut model = RewardModel::new(&config, &device);
    // A head large enough that rewards differ visibly.
    model.head.weight = model.head.weight.clone().map(|w| w.mul_scalar(1000.0));
    let a = vec![1, 5, 9, 13, 2];
    let alone = model.score(std::slice::from_ref(&a), 0)[0];
    let with_long_neighbour = model.score(&[vec![1, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 2], a.clone()], 0)[1];
    let with_other_pad = model.score(&[a.clone(), vec![1, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 2]], 49)[0];
    assert!(alone.abs() > 1e-3);
    assert!((alone - with_long_neighbour).abs() < 1e-5, "{alone} vs {with_long_neighbour}");
    assert!((alone - with_other_pad).abs() < 1e-5, "{alone} vs {with_other_pad}");
    let changed_last = model.score(&[vec![1, 5, 9, 13, 3]], 0)[0];
    assert!((alone - changed_last).abs() > 1e-4, "the reward is read at the last real token");
}

#[test]
fn bad_pair_files_are_named_errors_or_counted_skips() {
    let tok = Tokenizer::from_file(&repo().join("data/tokenizer.json")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let ok = r#"{"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away.", "rating": "better"}"#;
    let p = write("rating.jsonl", &format!("{ok}\n{}", r#"{"prompt": "Hi", "chosen": "a", "rejected": "b", "rating": "amazing"}"#));
    let err = load_pairs(&p, &tok, Category::Helpfulness).unwrap_err().to_string();
    assert!(err.contains("rating.jsonl:2") && err.contains("unknown rating `amazing`"), "{err}");
    let p = write("missing.jsonl", r#"{"prompt": "Hi", "chosen": "Hello."}"#);
    let err = load_pairs(&p, &tok, Category::Helpfulness).unwrap_err().to_string();
    assert!(err.contains("missing.jsonl:1") && err.contains("rejected"), "{err}");
    let p = write(
        "skips.jsonl",
        &format!("{ok}\n{}\n{}", r#"{"prompt": "Hi", "chosen": "Same.", "rejected": "Same."}"#, r#"{"prompt": "  ", "chosen": "a", "rejected": "b"}"#),
    );
    let (pairs, stats) = load_pairs(&p, &tok, Category::Safety).unwrap();
    assert_eq!((pairs.len(), stats.identical, stats.empty_prompt), (1, 1, 1));
    assert_eq!(pairs[0].category, Category::Safety, "no category on the line: the file's default");
    // The transcript form.
    let p = write("transcripts.jsonl", r#"{"chosen": "Human: hi Assistant: hello", "rejected": "Human: hi Assistant: no", "is_safety": true}"#);
    let (pairs, _) = load_pairs(&p, &tok, Category::Helpfulness).unwrap();
    assert_eq!((pairs[0].category, pairs[0].rating), (Category::Safety, Rating::Better));
    assert_eq!(*pairs[0].chosen.last().unwrap(), tok.eos_id());
}

fn accuracy(out: &Path, set: &str) -> (f64, f64) {
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let key = format!("eval/{set}/accuracy");
    let values: Vec<f64> = lines.iter().filter_map(|v| v.get(&key).and_then(|x| x.as_f64())).collect();
    (values[0], *values.last().unwrap())
}

/// Both tiny reward models, from a briefly pre-trained trunk, reach held-out accuracy well above
/// chance on their own set (held-out templates and values).
#[test]
fn tiny_reward_models_reach_high_held_out_accuracy() {
    let tmp = tempfile::tempdir().unwrap();
    llama_testkit::pretrain_tiny(tmp.path(), 64, 64, 10).unwrap();
    // Safety (refusal vs compliance) is easy; helpfulness needs the fact copied from the prompt
    // for its `better` pairs (a wrong fact), which a model this small only partly learns.
    for (target, bar) in [("helpfulness", 0.7), ("safety", 0.9)] {
        let cfg = tmp.path().join(format!("{target}.toml"));
        let text = std::fs::read_to_string(repo().join(format!("configs/reward-{target}-tiny.toml")))
            .unwrap()
            .replace("init = \"runs/sft-tiny\"", &format!("init = \"{}\"", tmp.path().join("pre").display()))
            .replace(&format!("out_dir = \"runs/reward-{target}-tiny\""), &format!("out_dir = \"{}\"", tmp.path().join(target).display()))
            .replace("\"data/", &format!("\"{}/data/", repo().display()));
        std::fs::write(&cfg, text).unwrap();
        let overrides = llama_reward::Overrides { max_steps: Some(120), ..Default::default() };
        llama_reward::run(&cfg, &overrides).unwrap();
        let (start, end) = accuracy(&tmp.path().join(target), target);
        assert!(end > bar, "{target}: held-out accuracy {start:.3} -> {end:.3} (chance: 0.5)");
    }
}

/// The memory estimate's count of a reward model's parameters (`LlamaConfig::reward_model_params`,
/// which `llama info --ppo` and PPO's launch check use) is the module's own, tied or not.
#[test]
fn the_estimate_counts_a_reward_model_s_parameters_exactly() {
    use burn::module::Module;
    let device = Device::flex();
    for tie in [false, true] {
        let config = LlamaConfig::new(64, 2, 4).with_n_kv_heads(2).with_vocab_size(300).with_multiple_of(16).with_tie_word_embeddings(tie);
        let model = if tie { RewardModel::from_trunk(config.init(&device), config.dim, &device) } else { RewardModel::new(&config, &device) };
        assert_eq!(model.num_params() as u64, config.reward_model_params(), "tied: {tie}");
    }
}
