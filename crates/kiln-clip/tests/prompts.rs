//! The A1111 web UI's prompt syntax and long prompts against `fixtures/prompts/`
//! (`xtask/fixtures/prompts.py`: the web UI's rules on transformers' CLIP).

mod common;

use std::path::{Path, PathBuf};

use burn::tensor::Tensor;
use common::{classic_tokenizer, device};
use kiln_clip::{ClipTextModel, ClipTokenizer, Error, PromptPiece, PromptSyntax, parse_prompt};
use kiln_nn::reference::{Reference, max_relative_error, tolerance};
use serde::Deserialize;

#[derive(Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    model: String,
    prompt: String,
    emphasis: bool,
    clip_skip: usize,
    ids: Vec<Vec<u32>>,
    weights: Vec<Vec<f32>>,
}

fn prompts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/prompts")
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(prompts_dir().join("cases.json")).unwrap();
    serde_json::from_str::<Cases>(&text).unwrap().cases
}

fn encoder(kind: &str) -> ClipTextModel {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/pipeline")
        .join(kind)
        .join("text_encoder");
    ClipTextModel::from_dir(&dir, &device()).unwrap()
}

impl Case {
    /// The case's windows by Kiln's tokenizer of its flavour (from `tokenizers`).
    fn windows(&self, tokenizers: &[(&str, tempfile::TempDir)]) -> kiln_clip::PromptWindows {
        let dir = &tokenizers.iter().find(|(k, _)| *k == self.model).unwrap().1;
        let tokenizer = ClipTokenizer::from_dir(dir.path()).unwrap();
        let syntax = if self.emphasis {
            PromptSyntax::A1111
        } else {
            PromptSyntax::Long
        };
        tokenizer.tokenize_prompt(&self.prompt, syntax).unwrap()
    }
}

#[test]
fn windows_and_weights_match_the_web_ui_rules() {
    let tokenizers = [
        ("sd1", classic_tokenizer("sd1")),
        ("sd2", classic_tokenizer("sd2")),
    ];
    let cases = cases();
    assert!(cases.iter().any(|c| c.ids.len() >= 3), "long cases");
    assert!(cases.iter().any(|c| c.model == "sd2"));
    for case in &cases {
        let got = case.windows(&tokenizers);
        assert_eq!(got.ids, case.ids, "{}: ids", case.name);
        assert_eq!(got.weights, case.weights, "{}: weights", case.name);
    }
}

#[test]
fn weighted_embeddings_match_the_web_ui_rules() {
    let reference = Reference::open(&prompts_dir().join("expected.safetensors")).unwrap();
    let encoders = [("sd1", encoder("sd1")), ("sd2", encoder("sd2"))];
    let tokenizers = [
        ("sd1", classic_tokenizer("sd1")),
        ("sd2", classic_tokenizer("sd2")),
    ];
    for case in cases() {
        let model = &encoders.iter().find(|(k, _)| *k == case.model).unwrap().1;
        let windows = case.windows(&tokenizers);
        let got = model
            .encode_windows(&windows, case.clip_skip, &device())
            .unwrap()
            .hidden_state;
        let want: Tensor<3> = reference
            .tensor(&format!("{}.embeds", case.name), &device())
            .unwrap();
        assert_eq!(got.dims(), want.dims(), "{}", case.name);
        let err = max_relative_error(&got, &want);
        // text-encoder forward passes, then two means and two products in f32
        assert!(err < tolerance::FORWARD, "{}: {err}", case.name);
    }
}

#[test]
fn plain_is_the_truncated_window_and_long_keeps_every_token() {
    let dir = classic_tokenizer("sd1");
    let tokenizer = ClipTokenizer::from_dir(dir.path()).unwrap();
    let prompt = "a (photo) of a cat, ".repeat(20);
    let plain = tokenizer
        .tokenize_prompt(&prompt, PromptSyntax::Plain)
        .unwrap();
    assert_eq!(plain.ids, vec![tokenizer.encode(&prompt).unwrap()]);
    assert!(plain.is_unweighted());
    let long = tokenizer
        .tokenize_prompt(&prompt, PromptSyntax::Long)
        .unwrap();
    let content: Vec<u32> = long
        .ids
        .iter()
        .flat_map(|w| {
            let end = w.iter().position(|&id| id == tokenizer.eos_id()).unwrap();
            w[1..end].to_vec()
        })
        .collect();
    assert_eq!(content, tokenizer.content_ids(&prompt).unwrap());
    assert_eq!(long.num_tokens, content.len());
    assert!(long.is_unweighted(), "Long reads brackets as text");
    // every window but the last ends at a comma (the comma rule)
    let comma = tokenizer.token_id(",</w>").unwrap();
    for w in &long.ids[..long.ids.len() - 1] {
        let end = w.iter().position(|&id| id == tokenizer.eos_id()).unwrap();
        assert_eq!(w[end - 1], comma);
    }
    let weighted = tokenizer
        .tokenize_prompt(&prompt, PromptSyntax::A1111)
        .unwrap();
    assert!(!weighted.is_unweighted());
}

fn text(text: &str, weight: f64) -> PromptPiece {
    PromptPiece::Text {
        text: text.to_string(),
        weight,
    }
}

#[test]
fn emphasis_nests_and_merges() {
    let parsed = parse_prompt("a ((b)) [c] (d:1.5) e").unwrap();
    assert_eq!(
        parsed,
        [
            text("a ", 1.0),
            text("b", 1.1 * 1.1),
            text(" ", 1.0),
            text("c", 1.0 / 1.1),
            text(" ", 1.0),
            text("d", 1.5),
            text(" e", 1.0),
        ]
    );
    assert_eq!(
        parse_prompt("x BREAK y").unwrap(),
        [text("x", 1.0), PromptPiece::Break, text("y", 1.0)]
    );
    assert_eq!(
        parse_prompt("\\(a\\) \\\\ \\: b\\x").unwrap(),
        [text("(a) \\ : bx", 1.0)]
    );
    assert_eq!(parse_prompt("").unwrap(), [text("", 1.0)]);
    // a break inside brackets is still a break
    assert_eq!(
        parse_prompt("(a BREAK b)").unwrap(),
        [text("a", 1.1), PromptPiece::Break, text("b", 1.1)]
    );
}

#[test]
fn malformed_syntax_names_the_position() {
    for (prompt, position, needle) in [
        ("a (cat", 3, "never closed"),
        ("a [cat", 3, "never closed"),
        ("a cat)", 6, "closes nothing"),
        ("a cat]", 6, "closes nothing"),
        ("(a [cat)]", 8, "closes the `[`"),
        ("(cat:1,2)", 6, "`1,2` is not a number"),
        ("(cat:abc)", 6, "`abc` is not a number"),
        ("(cat:1.2.3)", 6, "not a number"),
        ("(cat:)", 6, "not a number"),
        ("(cat:inf)", 6, "not a number"),
        ("(a:1.2 b)", 4, "not a number"),
        ("(a:b (c))", 3, "must be followed by a weight"),
    ] {
        let err = parse_prompt(prompt).unwrap_err();
        let message = err.to_string();
        match err {
            Error::PromptSyntax { position: p, .. } => {
                assert_eq!(p, position, "{prompt:?}: {message}");
            }
            other => panic!("{prompt:?}: {other}"),
        }
        assert!(message.contains(needle), "{prompt:?}: {message}");
    }
    // the tokenizer reports it too, and plain text is never parsed
    let dir = classic_tokenizer("sd1");
    let tokenizer = ClipTokenizer::from_dir(dir.path()).unwrap();
    assert!(
        tokenizer
            .tokenize_prompt("a (cat", PromptSyntax::A1111)
            .is_err()
    );
    for syntax in [PromptSyntax::Plain, PromptSyntax::Long] {
        assert!(tokenizer.tokenize_prompt("a (cat", syntax).is_ok());
    }
}
