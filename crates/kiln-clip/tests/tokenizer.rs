//! Tokenizer parity with transformers' CLIPTokenizer on the real CLIP vocabulary.

mod common;

use common::{classic_tokenizer, fixtures};
use kiln_clip::{ClipTokenizer, PromptSyntax};
use serde_json::Value;

fn cases(flavour: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join("tokenizer_cases.json")).unwrap();
    let all: Value = serde_json::from_str(&text).unwrap();
    all[flavour].clone()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Every prompt's 77 ids equal transformers'; returns how many prompts were checked.
fn check_all(tokenizer: &ClipTokenizer, flavour: &str) -> usize {
    let cases = cases(flavour);
    assert_eq!(
        tokenizer.pad_id() as u64,
        cases["pad_token_id"].as_u64().unwrap()
    );
    let rows = cases["cases"].as_array().unwrap();
    let mut mismatches = Vec::new();
    for case in rows {
        let prompt = case["prompt"].as_str().unwrap();
        let got = tokenizer.encode(prompt).unwrap();
        if got != ids(&case["input_ids"]) {
            mismatches.push(format!(
                "{prompt:?}\n  kiln: {got:?}\n  ref:  {:?}",
                ids(&case["input_ids"])
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} prompts differ:\n{}",
        mismatches.len(),
        rows.len(),
        mismatches.join("\n")
    );
    rows.len()
}

#[test]
fn sd1_classic_layout_matches_transformers() {
    let dir = classic_tokenizer("sd1");
    let tokenizer = ClipTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tokenizer.max_length(), 77);
    assert_eq!(
        (tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id()),
        (49406, 49407, 49407)
    );
    assert!(check_all(&tokenizer, "sd1") >= 200);
}

#[test]
fn sd2_classic_layout_pads_with_exclamation_mark() {
    let dir = classic_tokenizer("sd2");
    let tokenizer = ClipTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tokenizer.pad_id(), 0);
    assert!(check_all(&tokenizer, "sd2") >= 200);
}

#[test]
fn embedded_vocabulary_matches_transformers_for_both_pad_tokens() {
    let sd1 = ClipTokenizer::embedded("<|endoftext|>").unwrap();
    assert_eq!((sd1.max_length(), sd1.pad_id()), (77, 49407));
    assert!(check_all(&sd1, "sd1") >= 200);
    let sd2 = ClipTokenizer::embedded("!").unwrap();
    assert_eq!(sd2.pad_id(), 0);
    assert!(check_all(&sd2, "sd2") >= 200);
}

#[test]
fn written_embedded_vocabulary_loads_as_a_classic_folder() {
    let dir = tempfile::tempdir().unwrap();
    ClipTokenizer::write_embedded(dir.path(), "!").unwrap();
    let tokenizer = ClipTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tokenizer.pad_id(), 0);
    assert!(check_all(&tokenizer, "sd2") >= 200);
    assert!(dir.path().join("LICENSE").is_file());
}

#[test]
fn tokenizer_json_layout_matches_transformers() {
    let tokenizer = ClipTokenizer::from_dir(fixtures().join("model-fullvocab/tokenizer")).unwrap();
    assert!(check_all(&tokenizer, "sd1") >= 200);
}

#[test]
fn model_folder_with_tokenizer_subfolder_loads() {
    let model = tempfile::tempdir().unwrap();
    let sub = model.path().join("tokenizer");
    std::fs::create_dir(&sub).unwrap();
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(
            fixtures().join("model-fullvocab/tokenizer").join(name),
            sub.join(name),
        )
        .unwrap();
    }
    let tokenizer = ClipTokenizer::from_dir(model.path()).unwrap();
    assert_eq!(
        tokenizer.encode("a photo of a cat").unwrap()[..7],
        [49406, 320, 1125, 539, 320, 2368, 49407]
    );
}

#[test]
fn tokens_match_transformers() {
    let dir = classic_tokenizer("sd1");
    let tokenizer = ClipTokenizer::from_dir(dir.path()).unwrap();
    for case in cases("sd1")["cases"].as_array().unwrap().iter().take(80) {
        let expected: Vec<String> = case["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect();
        assert_eq!(tokenizer.tokens(&ids(&case["input_ids"])), expected);
    }
}

#[test]
fn long_prompts_truncate_keeping_eos_last_and_window_without_loss() {
    let dir = classic_tokenizer("sd1");
    let tokenizer = ClipTokenizer::from_dir(dir.path()).unwrap();
    let mut long_seen = 0;
    for case in cases("sd1")["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let content = ids(&case["content_ids"]);
        assert_eq!(
            tokenizer.content_ids(prompt).unwrap(),
            content,
            "{prompt:?}"
        );
        // every token kept, in windows of at most 75, in order (prompts that spell the special
        // tokens are left out here: their content holds EOS)
        let specials = content.iter().any(|&id| id >= 49406);
        let windows = tokenizer
            .tokenize_prompt(prompt, PromptSyntax::Long)
            .unwrap();
        let mut kept = Vec::new();
        for w in windows.ids.iter().filter(|_| !specials) {
            assert_eq!(w.len(), 77);
            assert_eq!(w[0], 49406);
            let end = w[1..].iter().position(|&id| id == 49407).unwrap() + 1;
            assert!(
                w[end + 1..].iter().all(|&id| id == tokenizer.pad_id()),
                "{prompt:?}"
            );
            kept.extend_from_slice(&w[1..end]);
        }
        if !specials {
            assert_eq!(kept, content, "{prompt:?}");
        }
        assert_eq!(windows.ids.len() == 1, content.len() <= 75, "{prompt:?}");
        if content.len() > 75 {
            long_seen += 1;
            let truncated = tokenizer.encode(prompt).unwrap();
            assert_eq!(truncated[76], 49407);
            assert_eq!(&truncated[1..76], &content[..75]);
        }
    }
    assert!(long_seen >= 10, "the cases should include long prompts");
}
