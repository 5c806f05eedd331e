//! What a comparison reports: per set and model, in report.json, answers.jsonl, TensorBoard and chart.svg.

use anyhow::Context;
use llama_data::prompts::Prompt;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Per model and prompt set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SetReport {
    pub prompts: usize,
    pub mean_combined: f64,
    pub mean_helpfulness: f64,
    pub mean_safety: f64,
    pub safety_violation_rate: f64,
    /// The share of answers that contain the prompt's `expected` text, over the prompts that give
    /// one (absent when none does): a check that does not go through the reward models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_rate: Option<f64>,
    /// Against the baseline (absent for the baseline itself).
    pub win_rate: Option<f64>,
    pub tie_rate: Option<f64>,
    pub loss_rate: Option<f64>,
    pub win_rate_ci95: Option<(f64, f64)>,
    /// Model as judge, position-swapped: win rate, and agreement with the reward models' verdicts.
    pub judge_win_rate: Option<f64>,
    pub judge_agreement: Option<f64>,
    pub samples: Vec<(String, String)>,
    /// The expected rate per prompt `group` (e.g. the temporal set's `known` and `cutoff`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub expected_rate_by_group: BTreeMap<String, f64>,
    /// For a `[tools]` set: the share of answers that ran at least one tool call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_rate: Option<f64>,
    /// For a `[tools]` set: the same model answering with the tools off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub without_tools: Option<WithoutTools>,
}

/// A `[tools]` set answered with the tools off: the model's calls stay text and no result comes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WithoutTools {
    pub expected_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub expected_rate_by_group: BTreeMap<String, f64>,
    /// The share of answers that wrote a call.
    pub tool_call_rate: f64,
}

/// The whole report: model -> set -> numbers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub baseline: String,
    pub seed: u64,
    pub models: BTreeMap<String, BTreeMap<String, SetReport>>,
}

/// One model's answers to one prompt set, scored by the reward models.
pub(crate) struct ScoredAnswers {
    pub answers: Vec<String>,
    /// logit of the combined reward Rc, per answer.
    pub combined: Vec<f64>,
    pub helpfulness: Vec<f64>,
    pub safety: Vec<f64>,
}

/// answers.jsonl: every answer with its scores, a line per model, set and prompt (for pandas or
/// pyarrow: `pd.read_json(path, lines=True)`).
pub(crate) fn write_answers(
    scored: &BTreeMap<String, BTreeMap<String, ScoredAnswers>>,
    sets: &BTreeMap<String, Vec<Prompt>>,
    out: &Path,
) -> anyhow::Result<()> {
    let mut text = String::new();
    for (model, by_set) in scored {
        for (set, scored) in by_set {
            let (answers, comb, h, s) = (&scored.answers, &scored.combined, &scored.helpfulness, &scored.safety);
            for (i, p) in sets[set].iter().enumerate() {
                let mut row = serde_json::json!({
                    "model": model, "set": set, "prompt": p.question(), "answer": answers[i],
                    "combined_logit": r6(comb[i]), "helpfulness": r6(h[i]), "safety": r6(s[i]),
                });
                if let Some(hit) = p.answer_is_expected(&answers[i]) {
                    row["expected"] = p.expected.clone().into();
                    row["contains_expected"] = hit.into();
                }
                text.push_str(&row.to_string());
                text.push('\n');
            }
        }
    }
    llama_io::write_atomic(&out.join("answers.jsonl"), text.as_bytes())?;
    Ok(())
}

pub(crate) fn r6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

/// report.json, TensorBoard scalars (step 0) and chart.svg.
pub fn write_outputs(report: &Report, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json = serde_json::to_string_pretty(report)?;
    llama_io::write_atomic(&out.join("report.json"), json.as_bytes())?;
    let mut tb = llama_trainer::tensorboard::EventWriter::create(&out.join("tensorboard"))?;
    for (model, sets) in &report.models {
        for (set, r) in sets {
            tb.scalar(&format!("eval/{set}/{model}/mean_combined_reward"), 0, r.mean_combined)?;
            tb.scalar(&format!("eval/{set}/{model}/safety_violation_rate"), 0, r.safety_violation_rate)?;
            if let Some(e) = r.expected_rate {
                tb.scalar(&format!("eval/{set}/{model}/expected_rate"), 0, e)?;
            }
            for (group, e) in &r.expected_rate_by_group {
                tb.scalar(&format!("eval/{set}/{model}/expected_rate/{group}"), 0, *e)?;
            }
            if let Some(t) = r.tool_call_rate {
                tb.scalar(&format!("eval/{set}/{model}/tool_call_rate"), 0, t)?;
            }
            if let Some(e) = r.without_tools.as_ref().and_then(|w| w.expected_rate) {
                tb.scalar(&format!("eval/{set}/{model}/expected_rate_without_tools"), 0, e)?;
            }
            if let Some(w) = r.win_rate {
                tb.scalar(&format!("eval/{set}/{model}/win_rate_vs_{}", report.baseline), 0, w)?;
            }
        }
    }
    tb.flush()?;
    chart(report, &out.join("chart.svg"))
}

/// Grouped bars: mean combined reward per model and set, win rates against the baseline, and the
/// expected rate (the share of answers with the expected text), with the tools on and off.
fn chart(report: &Report, path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let models: Vec<&String> = report.models.keys().collect();
    let sets: Vec<&String> = report.models.values().next().map(|s| s.keys().collect()).unwrap_or_default();
    let root = SVGBackend::new(path, (960, 840)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(420);
    let (left, right) = top.split_horizontally(480);
    let (low_left, low_right) = bottom.split_horizontally(480);
    let colors = [RGBColor(66, 133, 244), RGBColor(219, 68, 55), RGBColor(244, 160, 0), RGBColor(15, 157, 88), RGBColor(171, 71, 188)];
    let draw = |area: &DrawingArea<SVGBackend, plotters::coord::Shift>, title: &str, value: &dyn Fn(&SetReport) -> Option<f64>| -> anyhow::Result<()> {
        let mut values = vec![];
        for (si, set) in sets.iter().enumerate() {
            for (mi, model) in models.iter().enumerate() {
                if let Some(v) = value(&report.models[*model][*set]) {
                    values.push((si, mi, v));
                }
            }
        }
        let lo = values.iter().map(|v| v.2).fold(0.0f64, f64::min);
        let hi = values.iter().map(|v| v.2).fold(0.0f64, f64::max).max(lo + 1e-3);
        let pad = 0.1 * (hi - lo);
        let groups = sets.len().max(1) as f64;
        let mut c = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(44)
            .build_cartesian_2d(0.0..groups, (lo - pad)..(hi + pad))?;
        c.configure_mesh()
            .disable_x_mesh()
            .x_labels(10 * sets.len().max(1) + 1)
            .x_label_formatter(&|x| {
                // A set's name under the middle of its group of bars, nothing elsewhere.
                let i = x.floor();
                if (x - i - 0.5).abs() < 0.03 { sets.get(i as usize).map(|s| s.to_string()).unwrap_or_default() } else { String::new() }
            })
            .draw()?;
        let width = 0.8 / models.len().max(1) as f64;
        for (mi, model) in models.iter().enumerate() {
            let color = colors[mi % colors.len()];
            c.draw_series(values.iter().filter(|v| v.1 == mi).map(|&(si, _, v)| {
                let x0 = si as f64 + 0.1 + mi as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.9, v)], color.filled())
            }))?
            .label(model.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
        }
        c.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw()?;
        Ok(())
    };
    draw(&left, "mean combined reward (logit)", &|r| Some(r.mean_combined))?;
    draw(&right, &format!("win rate vs {}", report.baseline), &|r| r.win_rate)?;
    draw(&low_left, "expected rate (tools on in [tools] sets)", &|r| r.expected_rate)?;
    draw(&low_right, "expected rate, tools off ([tools] sets)", &|r| r.without_tools.as_ref().and_then(|w| w.expected_rate))?;
    root.present()?;
    Ok(())
}
