//! The tool runtime: a scripted "model" (fixed text per prompt) that calls the calculator gets the
//! result appended and goes on from the ids training would give; a batch with calls in some rows
//! and not others gives each row what it gets alone; the call cap holds; bad calls give error
//! results. Then the real model path: a stop inside `generate_until` keeps the tokens before it.

use burn::tensor::Device;
use llama_data::Tokenizer;
use llama_data::chat::Conversation;
use llama_model::LlamaConfig;
use llama_model::generate::{SamplingConfig, generate, generate_until, row_seed};
use llama_tools::{Continue, ModelContinue, SearchCorpus, ToolAnswer, ToolError, Toolbox, answer, answer_streaming};
use serde_json::json;

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(&llama_testkit::repo().join("data/tokenizer.json")).unwrap()
}

/// Continues each prompt with the text `script` gives for the prompt's decoded text, one token at
/// a time (stopping where the runtime says), then EOS. Records the prompts it was given.
struct Scripted<'a> {
    tokenizer: &'a Tokenizer,
    script: fn(&str) -> String,
    prompts: Vec<Vec<u32>>,
}

impl Continue for Scripted<'_> {
    fn continue_rows(
        &mut self,
        prompts: &[Vec<u32>],
        budgets: &[usize],
        _seeds: &[u64],
        stop: &mut dyn FnMut(usize, &[u32]) -> bool,
    ) -> Result<Vec<(Vec<u32>, bool)>, ToolError> {
        self.prompts.extend(prompts.iter().cloned());
        let mut out = vec![];
        for (row, prompt) in prompts.iter().enumerate() {
            let text = (self.script)(&self.tokenizer.decode(prompt)?);
            let mut script = self.tokenizer.encode(&text, false, true)?;
            // Encoded alone, the text gets the `▁` a tokenizer puts at a text's start: the
            // model would write the same word without it after a result.
            if prompt.len() > 1
                && self.tokenizer.decode(&prompt[prompt.len() - 1..])?.ends_with('>')
                && self.tokenizer.token_text(script[0]).as_deref() == Some("▁")
            {
                script.remove(0);
            }
            let mut tokens = vec![];
            let mut eos = false;
            for t in script {
                if tokens.len() == budgets[row] {
                    break;
                }
                tokens.push(t);
                if t == self.tokenizer.eos_id() {
                    eos = true;
                    break;
                }
                if stop(row, &tokens) {
                    break;
                }
            }
            out.push((tokens, eos));
        }
        Ok(out)
    }
}

fn ask(question: &str) -> Conversation {
    Conversation::from_json(&json!({"messages": [{"role": "user", "content": question}]})).unwrap()
}

/// Calls the calculator for "How long ago", answers "Hello." otherwise; reads the result back.
fn script(prompt: &str) -> String {
    if let Some(result) = prompt.rsplit("<result>").next().filter(|_| prompt.contains("<result>")) {
        let value = result.trim_end_matches("</result>");
        return if value.starts_with("error") { " I cannot work that out.".into() } else { format!(" That is {value} years ago.") };
    }
    if prompt.contains("How long ago") {
        " It was in 1989. <call>calculator(2026 - 1989)</call> and this is cut".into()
    } else if prompt.contains("Divide") {
        " <call>calculator(1 / 0)</call>".into()
    } else {
        " Hello.".into()
    }
}

fn run(questions: &[&str], tools: Option<&Toolbox>, script: fn(&str) -> String) -> (Vec<ToolAnswer>, Vec<Vec<u32>>) {
    let tok = tokenizer();
    let mut source = Scripted { tokenizer: &tok, script, prompts: vec![] };
    let chats: Vec<Conversation> = questions.iter().map(|q| ask(q)).collect();
    let answers = answer(&mut source, &tok, &chats, tools, 64, 256, 0).unwrap();
    (answers, source.prompts)
}

#[test]
fn a_call_is_run_its_result_appended_and_the_answer_goes_on() {
    let tools = Toolbox::new(None, 4);
    let (answers, prompts) = run(&["How long ago did the Berlin Wall fall?"], Some(&tools), script);
    let a = &answers[0];
    assert_eq!(a.text, "It was in 1989. <call>calculator(2026 - 1989)</call><result>37</result> That is 37 years ago.");
    assert_eq!((a.calls, a.call_limit_hit, a.stopped_on_eos), (1, false, true));
    // The second segment starts from the prompt with the answer so far encoded as one string.
    let tok = tokenizer();
    let chat = ask("How long ago did the Berlin Wall fall?");
    assert_eq!(prompts.len(), 2);
    assert_eq!(prompts[0], chat.prompt_ids(&tok).unwrap());
    assert_eq!(prompts[1], chat.prompt_ids_with_answer(&tok, " It was in 1989. <call>calculator(2026 - 1989)</call><result>37</result>").unwrap());
    assert_eq!(*a.sequence.last().unwrap(), tok.eos_id());
    assert_eq!(
        a.generated,
        a.sequence.len() - prompts[1].len() + tok.encode(" It was in 1989. <call>calculator(2026 - 1989)</call>", false, false).unwrap().len()
    );
}

#[test]
fn a_batch_gives_each_row_what_it_gets_alone() {
    let tools = Toolbox::new(None, 4);
    let questions = ["Hi!", "How long ago did the Berlin Wall fall?", "Divide 1 by 0.", "Hello?"];
    let (batch, _) = run(&questions, Some(&tools), script);
    for (q, got) in questions.iter().zip(&batch) {
        assert_eq!(got, &run(&[q], Some(&tools), script).0[0], "{q}");
    }
    assert_eq!(batch.iter().map(|a| a.calls).collect::<Vec<_>>(), vec![0, 1, 1, 0]);
    assert_eq!(batch[2].text, "<call>calculator(1 / 0)</call><result>error: division by zero</result> I cannot work that out.");
    assert_eq!(batch[0].text, "Hello.");
}

/// Streaming (`llama chat --tools`): each row's pieces, joined and trimmed, are its answer; the
/// model's text comes a token at a time and is cut at the call's `</call>` (the tail the script
/// writes after it never shows), and the result comes as one piece of its own.
#[test]
fn streamed_pieces_make_each_answer() {
    let tok = tokenizer();
    let tools = Toolbox::new(None, 4);
    let questions = ["Hi!", "How long ago did the Berlin Wall fall?", "Divide 1 by 0."];
    let chats: Vec<Conversation> = questions.iter().map(|q| ask(q)).collect();
    let mut pieces: Vec<Vec<String>> = vec![vec![]; questions.len()];
    let mut source = Scripted { tokenizer: &tok, script, prompts: vec![] };
    let answers =
        answer_streaming(&mut source, &tok, &chats, Some(&tools), 64, 256, 0, Some(&mut |row: usize, piece: &str| pieces[row].push(piece.to_string())))
            .unwrap();
    assert_eq!(answers, run(&questions, Some(&tools), script).0, "streaming changes no answer");
    for (a, p) in answers.iter().zip(&pieces) {
        assert_eq!(p.concat().trim(), a.text);
        assert!(p.iter().all(|piece| !piece.is_empty()));
    }
    assert!(pieces[1].len() > 10, "token by token: {:?}", pieces[1]);
    assert!(pieces[1].contains(&"<result>37</result>".to_string()), "{:?}", pieces[1]);
    assert!(!pieces[1].concat().contains("and this is cut"));
    assert_eq!(pieces[2].iter().filter(|p| p.contains("<result>")).collect::<Vec<_>>(), vec!["<result>error: division by zero</result>"]);
}

#[test]
fn without_tools_the_call_is_plain_text() {
    let (answers, prompts) = run(&["How long ago did the Berlin Wall fall?"], None, script);
    assert_eq!(answers[0].text, "It was in 1989. <call>calculator(2026 - 1989)</call> and this is cut");
    assert_eq!((answers[0].calls, prompts.len()), (0, 1));
}

#[test]
fn the_call_cap_ends_an_answer_that_keeps_calling() {
    fn always_calls(_: &str) -> String {
        " <call>calculator(1 + 1)</call>".into()
    }
    let tools = Toolbox::new(None, 2);
    let (answers, prompts) = run(&["Add."], Some(&tools), always_calls);
    let a = &answers[0];
    assert_eq!((a.calls, a.call_limit_hit, a.stopped_on_eos), (2, true, false));
    assert_eq!(a.text, "<call>calculator(1 + 1)</call><result>2</result><call>calculator(1 + 1)</call><result>2</result><call>calculator(1 + 1)</call>");
    assert_eq!(prompts.len(), 3, "two results, then the third call ends the answer unrun");
}

#[test]
fn search_results_come_from_the_corpus() {
    fn looks_up(prompt: &str) -> String {
        if prompt.contains("<result>") { " Done.".into() } else { " <call>search(the capital of Veltria)</call>".into() }
    }
    let mut corpus = SearchCorpus::default();
    corpus.insert("capital of Veltria", "Morvan");
    let tools = Toolbox::new(Some(corpus), 4);
    let (answers, _) = run(&["Capital?"], Some(&tools), looks_up);
    assert_eq!(answers[0].text, "<call>search(the capital of Veltria)</call><result>Morvan</result> Done.");
}

#[test]
fn the_model_path_stops_where_asked_and_matches_plain_generation() {
    let device = Device::flex();
    let tok = tokenizer();
    let model = LlamaConfig::new(32, 2, 4).with_n_kv_heads(2).with_vocab_size(tok.vocab_size()).with_multiple_of(16).with_max_seq_len(128).init(&device);
    let prompts: Vec<Vec<u32>> =
        ["Hi", "How long ago was it?", "A much longer prompt than the others, to pad"].iter().map(|q| ask(q).prompt_ids(&tok).unwrap()).collect();
    let config = SamplingConfig { eos_id: Some(tok.eos_id()), ..SamplingConfig::greedy(12) };
    let plain = generate(&model, &prompts, &config).unwrap();
    let seeds: Vec<u64> = (0..3).map(|i| row_seed(0, i)).collect();
    let stopped = generate_until(&model, &prompts, &config, &seeds, |_, _| {}, |row, tokens| row == 1 && tokens.len() == 3).unwrap();
    assert_eq!(stopped.tokens[1], plain.tokens[1][..3.min(plain.tokens[1].len())]);
    assert_eq!((stopped.tokens[0].clone(), stopped.tokens[2].clone()), (plain.tokens[0].clone(), plain.tokens[2].clone()), "other rows go on");
    // The runtime with tools, on a model that writes no call: plain generation's answers.
    let chats: Vec<Conversation> = ["Hi", "How long ago was it?", "A much longer prompt than the others, to pad"].iter().map(|q| ask(q)).collect();
    let tools = Toolbox::new(None, 4);
    let mut source = ModelContinue { model: &model, sampling: config.clone(), slots: usize::MAX };
    let answers = answer(&mut source, &tok, &chats, Some(&tools), 12, 128, 0).unwrap();
    for ((a, p), g) in answers.iter().zip(&prompts).zip(&plain.tokens) {
        assert_eq!(a.text, tok.decode_after(p, g).unwrap().trim(), "no call: one segment, generate's tokens");
        assert_eq!(a.sequence, [p.as_slice(), g].concat());
    }
}
