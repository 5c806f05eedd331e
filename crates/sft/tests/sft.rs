//! SFT: golden template ids, the answer-only mask's exact zero gradient, Ghost Attention data,
//! and fine-tuning raising the held-out success rate (bad input: `bad_input.rs`).

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor, TensorData};
use llama_data::Tokenizer;
use llama_data::chat::{Conversation, Overlong, load_conversations, pack};
use llama_model::LlamaConfig;
use llama_sft::{batch_tensors, ghost_attention, masked_nll_sum};
use serde_json::json;

fn repo() -> PathBuf {
    Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("run under cargo")).join("../..")
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(&repo().join("data/tokenizer.json")).unwrap()
}

fn conv(v: serde_json::Value) -> Conversation {
    Conversation::from_json(&v).unwrap()
}

const INST_NAME: [u32; 21] = [340, 312, 294, 299, 304, 305, 313, 591, 921, 408, 745, 1577, 285, 340, 312, 272, 294, 299, 304, 305, 313];
const ALICE: [u32; 8] = [1028, 573, 1577, 408, 2000, 637, 271, 340];

#[test]
fn golden_template_token_ids() {
    let tok = tokenizer();
    // Single turn, no system prompt: <s>[INST] What is my name? [/INST] Your name is Alice. </s>
    let single = conv(json!({"prompt": "What is my name?", "response": "Your name is Alice."}));
    assert_eq!(single.render_text(), "<s>[INST] What is my name? [/INST] Your name is Alice. </s>");
    let (ids, mask) = single.tokenize(&tok).unwrap();
    let want: Vec<u32> = [vec![1], INST_NAME.to_vec(), ALICE.to_vec(), vec![2]].concat();
    assert_eq!(ids, want);
    let want_mask: Vec<bool> = [vec![false; 1 + INST_NAME.len()], vec![true; ALICE.len() + 1]].concat();
    assert_eq!(mask, want_mask);

    // Multi-turn with a system prompt folded into the first user turn.
    let multi = conv(json!({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Bye."}]}));
    assert_eq!(multi.render_text(), "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] Thanks [/INST] Bye. </s>");
    let sys_hi: Vec<u32> = vec![
        340, 312, 294, 299, 304, 305, 313, 340, 63, 63, 304, 310, 304, 65, 65, 259, 287, 318, 358, 485, 1405, 271, 259, 63, 63, 272, 304, 310, 304, 65, 65,
        349, 293, 322, 340, 312, 272, 294, 299, 304, 305, 313,
    ];
    let hello = vec![534, 898, 328, 271, 340];
    let thanks = vec![340, 312, 294, 299, 304, 305, 313, 1565, 1118, 332, 340, 312, 272, 294, 299, 304, 305, 313];
    let bye = vec![516, 338, 318, 271, 340];
    let (ids, mask) = multi.tokenize(&tok).unwrap();
    assert_eq!(ids, [vec![1], sys_hi.clone(), hello.clone(), vec![2, 1], thanks.clone(), bye.clone(), vec![2]].concat());
    let mask_want = [vec![false; 1 + sys_hi.len()], vec![true; hello.len() + 1], vec![false; 1 + thanks.len()], vec![true; bye.len() + 1]].concat();
    assert_eq!(mask, mask_want);
    // The generation prompt stops after the last [/INST].
    let prompt = multi.prompt_ids(&tok).unwrap();
    assert_eq!(prompt, [vec![1], sys_hi, hello, vec![2, 1], thanks].concat());
}

/// Changing the target of a masked (user) position changes neither the loss nor any gradient;
/// changing an answer target does.
#[test]
fn masked_tokens_get_exactly_zero_gradient() {
    let tok = tokenizer();
    let device = Device::flex().autodiff();
    let config = LlamaConfig::new(32, 2, 2).with_vocab_size(tok.vocab_size()).with_multiple_of(16).with_max_seq_len(64);
    let model = config.init(&device);
    let c = conv(json!({"prompt": "What is my name?", "response": "Your name is Alice."}));
    let (packed, _) = pack(&[c.tokenize(&tok).unwrap()], 40, tok.eos_id(), Overlong::Truncate);
    let user_pos = 5;
    let answer_pos = packed[0].loss_mask.iter().position(|&m| m).unwrap();
    assert!(!packed[0].loss_mask[user_pos]);
    for separate in [false, true] {
        let (inputs, targets, mask, attention) = batch_tensors(&packed, separate, &device);
        let with_target = |pos: usize, id: i64| {
            let mut t = targets.clone().into_data().convert::<i64>().try_into_vec::<i64>().unwrap();
            t[pos] = id;
            Tensor::<2, Int>::from_data(TensorData::new(t, [40, 1]), &device)
        };
        let a = masked_nll_sum(&model, inputs.clone(), targets.clone(), mask.clone(), attention.clone());
        let b = masked_nll_sum(&model, inputs.clone(), with_target(user_pos, 777), mask.clone(), attention.clone());
        assert_eq!(a.clone().into_scalar::<f32>(), b.clone().into_scalar::<f32>());
        let (ga, gb) = (GradientsParams::from_grads(a.clone().backward(), &model), GradientsParams::from_grads(b.backward(), &model));
        for id in [model.output.as_ref().unwrap().weight.id, model.layers[0].attention.wq.weight.id] {
            assert_eq!(ga.get::<2>(id).unwrap().into_data(), gb.get::<2>(id).unwrap().into_data(), "separate = {separate}");
        }
        let c = masked_nll_sum(&model, inputs, with_target(answer_pos, 777), mask, attention);
        assert_ne!(a.into_scalar::<f32>(), c.into_scalar::<f32>());
    }
}

#[test]
fn ghost_attention_keeps_the_instruction_in_the_first_turn_and_trains_the_last_answer() {
    let dialogues = load_conversations(&repo().join("data/chat/multiturn.jsonl")).unwrap();
    let instructions = vec!["Act as a pirate.".to_string()];
    let out = ghost_attention(&dialogues, &instructions, 0).unwrap();
    assert_eq!(out.len(), dialogues.len());
    let tok = tokenizer();
    for (g, d) in out.iter().zip(&dialogues) {
        let users: Vec<_> = g.exchanges().into_iter().map(|(u, _)| u.content.clone()).collect();
        assert!(users[0].starts_with("Act as a pirate. "));
        assert!(users[1..].iter().all(|u| !u.contains("pirate")));
        let answers: Vec<bool> = g.exchanges().into_iter().filter_map(|(_, a)| a.map(|a| a.train)).collect();
        assert_eq!(answers, vec![false, true]);
        // Only the last answer (and its EOS) carries loss.
        let (ids, mask) = g.tokenize(&tok).unwrap();
        let trained = mask.iter().filter(|&&m| m).count();
        let last_answer = tok.encode(&format!(" {} ", d.messages.last().unwrap().content), false, false).unwrap().len() + 1;
        assert_eq!(trained, last_answer);
        assert_eq!(ids.iter().filter(|&&t| t == tok.eos_id()).count(), 2);
    }
    // Round trip through the chat format.
    let json = serde_json::to_value(&out[0]).unwrap();
    assert_eq!(Conversation::from_json(&json).unwrap(), out[0]);
}

/// A short pre-training, then SFT on the shipped chats: the held-out success rate (answers that
/// contain the fact given in the question) rises above the pre-trained model's. Copying the fact
/// takes the small model a few hundred steps (450 here, about two minutes).
#[test]
fn fine_tuning_raises_the_held_out_success_rate() {
    let tmp = tempfile::tempdir().unwrap();
    llama_testkit::pretrain_tiny(tmp.path(), 64, 64, 20).unwrap();

    let sft_cfg = tmp.path().join("sft.toml");
    let text = std::fs::read_to_string(repo().join("configs/sft-tiny.toml"))
        .unwrap()
        .replace("init = \"runs/tiny\"", &format!("init = \"{}\"", tmp.path().join("pre").display()))
        .replace("out_dir = \"runs/sft-tiny\"", &format!("out_dir = \"{}\"", tmp.path().join("sft").display()))
        .replace("seq_len = 128", "seq_len = 96")
        .replace("epochs = 3 ", "epochs = 100 ")
        .replace("lr = 1e-3 ", "lr = 3e-3 ")
        .replace("eval_every = 50", "eval_every = 1000")
        .replace("success_samples = 100", "success_samples = 40");
    std::fs::write(&sft_cfg, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sft")).args(["--config", sft_cfg.to_str().unwrap(), "--max-steps", "450"]).current_dir(repo()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rates: Vec<(u64, f64)> = std::fs::read_to_string(tmp.path().join("sft/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| Some((v["step"].as_u64()?, v.get("eval/success_rate")?.as_f64()?)))
        .collect();
    let (first, last) = (rates.first().unwrap(), rates.last().unwrap());
    assert_eq!(first.0, 0, "the starting model is evaluated at step 0");
    assert!(last.1 > first.1 + 0.15, "success rate {first:?} -> {last:?} did not rise enough\n{stdout}");
}

/// A checkpoint that brings its own tokenizer (special tokens named `<|im_start|>` /
/// `<|im_end|>`, no `<s>` in its tokenizer_config.json) and ChatML chat template fine-tunes with
/// `data.chat_template = "tokenizer"`: the chats render through its template and the loss falls.
#[test]
fn fine_tuning_a_model_with_its_own_tokenizer_and_chat_template() {
    let tmp = tempfile::tempdir().unwrap();
    let mut inner = tokenizers::Tokenizer::from_file(repo().join("data/tokenizer.json")).unwrap();
    inner.add_special_tokens([tokenizers::AddedToken::from("<|im_start|>", true), tokenizers::AddedToken::from("<|im_end|>", true)]).unwrap();
    let init = tmp.path().join("init");
    std::fs::create_dir_all(&init).unwrap();
    inner.save(init.join("tokenizer.json"), false).unwrap();
    let chatml = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
    let config = serde_json::json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": chatml});
    std::fs::write(init.join("tokenizer_config.json"), config.to_string()).unwrap();
    let model = LlamaConfig::new(32, 2, 2).with_vocab_size(2050).with_multiple_of(16).with_max_seq_len(128);
    llama_model::checkpoint::save_native(&model.init(&Device::flex()), &model, &init).unwrap();
    let sft_cfg = tmp.path().join("sft.toml");
    let text = std::fs::read_to_string(repo().join("configs/sft-tiny.toml"))
        .unwrap()
        .replace("init = \"runs/tiny\"", &format!("init = \"{}\"", init.display()))
        .replace("tokenizer = \"data/tokenizer.json\"", &format!("tokenizer = \"{}\"\nchat_template = \"tokenizer\"", init.join("tokenizer.json").display()))
        .replace("out_dir = \"runs/sft-tiny\"", &format!("out_dir = \"{}\"", tmp.path().join("sft").display()))
        .replace("eval_every = 100", "eval_every = 1000")
        .replace("success_samples = 100", "success_samples = 4");
    std::fs::write(&sft_cfg, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sft")).args(["--config", sft_cfg.to_str().unwrap(), "--max-steps", "40"]).current_dir(repo()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("answer tokens"), "{stdout}");
    let losses: Vec<f64> = llama_testkit::train_curve(tmp.path().join("sft")).into_iter().map(|(_, loss, _)| loss).collect();
    assert!(losses.len() >= 3 && losses.last().unwrap() < &(losses[0] - 1.0), "the loss falls: {losses:?}");
}

/// Chats in Parquet (written by pyarrow, tests/fixtures/make_parquet_fixtures.py) read like JSONL.
#[test]
fn parquet_chats_are_read_in_both_forms() {
    let chats = load_conversations(&repo().join("tests/fixtures/chat.parquet")).unwrap();
    assert_eq!(chats.len(), 2);
    assert_eq!(chats[0].render_text(), "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s>");
    assert_eq!(chats[1].render_text(), "<s>[INST] My name is Ann. What is my name? [/INST] Your name is Ann. </s>");
    let pr = load_conversations(&repo().join("tests/fixtures/chat_prompt_response.parquet")).unwrap();
    assert_eq!(pr[1].render_text(), "<s>[INST] Bye [/INST] Goodbye. </s>");
}
