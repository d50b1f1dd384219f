//! Prompts as the A1111 web UI reads them: emphasis syntax, `BREAK`, and prompts longer than one
//! 77-token window.
//!
//! [`PromptSyntax`] picks the rules. [`ClipTokenizer::tokenize_prompt`] turns a prompt into
//! [`PromptWindows`] (token ids and a weight per token, 77 of each per window) and
//! [`ClipTextModel::encode_windows`](crate::ClipTextModel::encode_windows) encodes them: each
//! window on its own, the hidden states multiplied by the weights with the window's mean
//! restored, the windows concatenated along the sequence axis (`[1, 77 * windows, width]`).
//!
//! The rules are the web UI's (`modules/prompt_parser.py`, `modules/sd_hijack_clip.py`, emphasis
//! "Original"):
//!
//! - `(text)` multiplies the weight of its tokens by 1.1, `[text]` divides it by 1.1, and
//!   `(text:1.3)` multiplies it by 1.3; they nest (`((text))` is 1.21).
//! - `\(`, `\)`, `\[`, `\]` and `\\` are the characters themselves; `\:` is a colon inside
//!   parentheses that is not a weight. A backslash before any other character is dropped.
//! - `BREAK` (upper case, a word of its own) ends the current window.
//! - Text is cut where the weight changes and each piece is tokenized on its own.
//! - The tokens fill windows of 75 between BOS and EOS, padded with the tokenizer's pad token.
//!   When a window is full and a comma is among its last 20 tokens, the tokens after the comma
//!   move to the next window (the UI's `comma_padding_backtrack`).
//!
//! Where the web UI guesses, Kiln reports an error that names the position: an unbalanced or
//! mismatched bracket, or a weight that is not a number (`(cat:1,2)`). The web UI reads
//! `BREAK` inside brackets as a word weighted -1.1; Kiln breaks there too.

use crate::{ClipTokenizer, Error, Result};

/// How prompt text becomes token windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PromptSyntax {
    /// diffusers' rule: the text is taken literally and truncated to one window of
    /// `max_length` tokens (77).
    #[default]
    Plain,
    /// Every token kept, in windows of 75 with the web UI's comma rule; the text is taken
    /// literally (the web UI with emphasis off).
    Long,
    /// The web UI's rules: emphasis, escapes and `BREAK`, in windows as for [`Long`](Self::Long).
    A1111,
}

/// The multiplier of `(text)`; `[text]` divides by it.
const BRACKET_MULTIPLIER: f64 = 1.1;

/// How far back (in tokens) a full window looks for a comma to break at.
const COMMA_BACKTRACK: usize = 20;

/// One piece of a parsed prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptPiece {
    /// Text and the weight of its tokens.
    Text {
        /// The text, escapes resolved.
        text: String,
        /// The product of the brackets around it.
        weight: f64,
    },
    /// `BREAK`: the next text starts a new window.
    Break,
}

/// Parses the web UI's emphasis syntax: the text in pieces of equal weight, in order, adjacent
/// pieces of the same weight merged (as the web UI merges them before tokenizing).
///
/// An empty prompt gives one empty piece of weight 1.
pub fn parse_prompt(prompt: &str) -> Result<Vec<PromptPiece>> {
    let chars: Vec<char> = prompt.chars().collect();
    let mut pieces: Vec<(String, f64)> = Vec::new();
    // (kind, index into pieces where the group starts, char position of the bracket)
    let mut open: Vec<(char, usize, usize)> = Vec::new();
    // text waiting to be split at BREAK and pushed
    let mut text = String::new();
    let flush = |text: &mut String, pieces: &mut Vec<(String, f64)>| {
        if !text.is_empty() {
            push_text(pieces, std::mem::take(text));
        }
    };
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\\' => {
                match chars.get(i + 1) {
                    Some(&next @ ('(' | ')' | '[' | ']' | '\\' | ':')) => {
                        flush(&mut text, &mut pieces);
                        pieces.push((next.to_string(), 1.0));
                        i += 2;
                    }
                    // a lone backslash is dropped, as in the web UI
                    _ => i += 1,
                }
                continue;
            }
            '(' | '[' => {
                flush(&mut text, &mut pieces);
                open.push((c, pieces.len(), i));
            }
            ')' | ']' => {
                flush(&mut text, &mut pieces);
                let expected = if c == ')' { '(' } else { '[' };
                match open.pop() {
                    Some((kind, start, _)) if kind == expected => {
                        let factor = if c == ')' {
                            BRACKET_MULTIPLIER
                        } else {
                            1.0 / BRACKET_MULTIPLIER
                        };
                        multiply(&mut pieces[start..], factor);
                    }
                    Some((kind, _, at)) => {
                        return Err(syntax_error(
                            prompt,
                            i,
                            format!(
                                "`{c}` closes the `{kind}` at character {}; close brackets in \
                                 the order they were opened",
                                at + 1
                            ),
                        ));
                    }
                    None => {
                        return Err(syntax_error(
                            prompt,
                            i,
                            format!("`{c}` closes nothing; write `\\{c}` for the character itself"),
                        ));
                    }
                }
            }
            ':' if matches!(open.last(), Some(('(', _, _))) => {
                // `(text:weight)`: the weight runs to the closing parenthesis
                let end = chars[i + 1..]
                    .iter()
                    .position(|&ch| matches!(ch, '(' | ')' | '[' | ']' | ':' | '\\'))
                    .map(|p| i + 1 + p);
                match end {
                    Some(end) if chars[end] == ')' => {
                        let literal: String = chars[i + 1..end].iter().collect();
                        let weight = parse_weight(literal.trim()).ok_or_else(|| {
                            syntax_error(
                                prompt,
                                i + 1,
                                format!(
                                    "the weight `{}` is not a number; write it as in `(text:1.2)`, \
                                     or `\\:` for a colon",
                                    literal.trim()
                                ),
                            )
                        })?;
                        flush(&mut text, &mut pieces);
                        let (_, start, _) = open.pop().expect("checked above");
                        multiply(&mut pieces[start..], weight);
                        i = end + 1;
                        continue;
                    }
                    _ => {
                        return Err(syntax_error(
                            prompt,
                            i,
                            "a `:` inside parentheses must be followed by a weight and `)`, as \
                             in `(text:1.2)`; write `\\:` for a colon"
                                .to_string(),
                        ));
                    }
                }
            }
            _ => text.push(c),
        }
        i += 1;
    }
    flush(&mut text, &mut pieces);
    if let Some((kind, _, at)) = open.last() {
        let close = if *kind == '(' { ')' } else { ']' };
        return Err(syntax_error(
            prompt,
            *at,
            format!(
                "`{kind}` is never closed; add `{close}`, or write `\\{kind}` for the character itself"
            ),
        ));
    }
    // merge runs of equal weight (a BREAK, weight NaN, merges with nothing)
    let mut merged: Vec<(String, f64)> = Vec::with_capacity(pieces.len());
    for (text, weight) in pieces {
        match merged.last_mut() {
            Some((last, w)) if *w == weight => last.push_str(&text),
            _ => merged.push((text, weight)),
        }
    }
    if merged.is_empty() {
        merged.push((String::new(), 1.0));
    }
    Ok(merged
        .into_iter()
        .map(|(text, weight)| {
            if weight.is_nan() {
                PromptPiece::Break
            } else {
                PromptPiece::Text { text, weight }
            }
        })
        .collect())
}

/// A weight as the web UI writes it (`[+-]?[.\d]+`: `1.2`, `.5`, `-0.3`), finite.
fn parse_weight(text: &str) -> Option<f64> {
    let digits = text.strip_prefix(['+', '-']).unwrap_or(text);
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return None;
    }
    text.parse().ok().filter(|w: &f64| w.is_finite())
}

/// Pushes plain text, split at `BREAK` words (the whitespace around each dropped). A break is
/// stored as weight NaN, which no bracket changes and nothing merges with.
fn push_text(pieces: &mut Vec<(String, f64)>, text: String) {
    let mut rest = text.as_str();
    while let Some((before, after)) = split_break(rest) {
        pieces.push((before.to_string(), 1.0));
        pieces.push((String::new(), f64::NAN));
        rest = after;
    }
    pieces.push((rest.to_string(), 1.0));
}

/// The text before the first `BREAK` word (trailing whitespace dropped) and after it (leading
/// whitespace dropped), as the web UI's `\s*\bBREAK\b\s*` splits.
fn split_break(text: &str) -> Option<(&str, &str)> {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut from = 0;
    while let Some(p) = text[from..].find("BREAK") {
        let start = from + p;
        let end = start + "BREAK".len();
        let before_ok = text[..start]
            .chars()
            .next_back()
            .is_none_or(|c| !is_word(c));
        let after_ok = text[end..].chars().next().is_none_or(|c| !is_word(c));
        if before_ok && after_ok {
            return Some((text[..start].trim_end(), text[end..].trim_start()));
        }
        from = end;
    }
    None
}

/// Multiplies the weights of `pieces` (breaks, weight NaN, stay NaN).
fn multiply(pieces: &mut [(String, f64)], factor: f64) {
    for (_, w) in pieces {
        *w *= factor;
    }
}

/// A syntax error at char index `at` of `prompt`, with the text around it.
fn syntax_error(prompt: &str, at: usize, message: String) -> Error {
    let chars: Vec<char> = prompt.chars().collect();
    let from = at.saturating_sub(20);
    let to = (at + 20).min(chars.len());
    let context: String = chars[from..to].iter().collect();
    Error::PromptSyntax {
        position: at + 1,
        context,
        message,
    }
}

/// A prompt as the text encoder reads it: windows of `max_length` token ids (77) and the weight
/// of each token.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptWindows {
    /// Token ids, `max_length` per window: BOS, up to 75 tokens, EOS, padding.
    pub ids: Vec<Vec<u32>>,
    /// The weight of each id (1 for BOS, EOS and padding).
    pub weights: Vec<Vec<f32>>,
    /// Prompt tokens in all (BOS, EOS and padding not counted).
    pub num_tokens: usize,
}

impl PromptWindows {
    /// Whether every weight is 1 (the hidden states are then used as they are).
    pub fn is_unweighted(&self) -> bool {
        self.weights.iter().flatten().all(|&w| w == 1.0)
    }
}

impl ClipTokenizer {
    /// Tokenizes a prompt by `syntax`'s rules into windows of `max_length` ids with a weight per
    /// id. [`PromptSyntax::Plain`] gives exactly [`encode`](Self::encode)'s one window.
    pub fn tokenize_prompt(&self, prompt: &str, syntax: PromptSyntax) -> Result<PromptWindows> {
        let room = self.max_length() - 2;
        let pieces = match syntax {
            PromptSyntax::Plain => {
                let content = self.content_ids(prompt)?;
                let ids = self.wrap(&content);
                return Ok(PromptWindows {
                    weights: vec![vec![1.0; ids.len()]],
                    ids: vec![ids],
                    num_tokens: content.len().min(room),
                });
            }
            PromptSyntax::Long => vec![PromptPiece::Text {
                text: prompt.to_string(),
                weight: 1.0,
            }],
            PromptSyntax::A1111 => parse_prompt(prompt)?,
        };
        let comma = self.token_id(",</w>");
        let mut windows = WindowBuilder {
            room,
            ids: Vec::new(),
            weights: Vec::new(),
            current: Vec::new(),
            last_comma: None,
            num_tokens: 0,
        };
        for piece in &pieces {
            let (text, weight) = match piece {
                PromptPiece::Break => {
                    windows.finish_window();
                    continue;
                }
                PromptPiece::Text { text, weight } => (text, *weight),
            };
            let ids = self.content_ids(text)?;
            let mut i = 0;
            while i < ids.len() {
                let n = self.embedding_len(ids[i]);
                if n > 1 && i + n <= ids.len() {
                    windows.push_group(&ids[i..i + n], weight);
                    i += n;
                } else {
                    windows.push(ids[i], weight, Some(ids[i]) == comma);
                    i += 1;
                }
            }
        }
        if !windows.current.is_empty() || windows.ids.is_empty() {
            windows.finish_window();
        }
        let num_tokens = windows.num_tokens;
        let (ids, weights) = (windows.ids, windows.weights);
        Ok(PromptWindows {
            ids: ids.iter().map(|w| self.wrap(w)).collect(),
            weights: weights
                .into_iter()
                .map(|w| {
                    let mut row = Vec::with_capacity(self.max_length());
                    row.push(1.0);
                    row.extend(w.iter().map(|&x| x as f32));
                    row.resize(self.max_length(), 1.0);
                    row
                })
                .collect(),
            num_tokens,
        })
    }
}

/// Fills windows of `room` tokens as the web UI's `tokenize_line` does.
struct WindowBuilder {
    room: usize,
    ids: Vec<Vec<u32>>,
    weights: Vec<Vec<f64>>,
    current: Vec<(u32, f64)>,
    /// Index in `current` of its last comma.
    last_comma: Option<usize>,
    num_tokens: usize,
}

impl WindowBuilder {
    /// What the web UI does before placing a token: note a comma, move the text after the last
    /// comma of a full window to the next one, start a new window when this one is full.
    fn make_room(&mut self, is_comma: bool) {
        if is_comma {
            self.last_comma = Some(self.current.len());
        } else if let Some(comma) = self.last_comma
            && self.current.len() == self.room
            && self.room - comma <= COMMA_BACKTRACK
        {
            // the window is full: the tokens after its last comma start the next one
            let moved = self.current.split_off(comma + 1);
            self.finish_window();
            self.current = moved;
        }
        if self.current.len() == self.room {
            self.finish_window();
        }
    }

    fn push(&mut self, id: u32, weight: f64, is_comma: bool) {
        self.make_room(is_comma);
        self.current.push((id, weight));
        self.num_tokens += 1;
    }

    /// A multi-vector embedding's ids, kept in one window.
    fn push_group(&mut self, ids: &[u32], weight: f64) {
        self.make_room(false);
        if self.current.len() + ids.len() > self.room {
            self.finish_window();
        }
        self.current.extend(ids.iter().map(|&id| (id, weight)));
        self.num_tokens += ids.len();
    }

    fn finish_window(&mut self) {
        let window = std::mem::take(&mut self.current);
        self.ids.push(window.iter().map(|&(id, _)| id).collect());
        self.weights.push(window.iter().map(|&(_, w)| w).collect());
        self.last_comma = None;
    }
}

/// An A1111 extra-network tag such as `<lora:NAME:0.8>`, found in a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtraNetwork {
    /// The kind before the first colon (`lora`).
    pub kind: String,
    /// The fields after it, split at `:` (`["NAME", "0.8"]`).
    pub args: Vec<String>,
    /// 1-based character position of the `<`.
    pub position: usize,
}

/// Takes the web UI's extra-network tags (`<kind:arg:arg...>`, such as `<lora:NAME:0.8>`) out of
/// a prompt: the prompt without them and the tags in order. The text around a tag is kept as it
/// is, as the web UI keeps it.
pub fn extract_extra_networks(prompt: &str) -> (String, Vec<ExtraNetwork>) {
    let mut text = String::with_capacity(prompt.len());
    let mut tags = Vec::new();
    let mut rest = prompt;
    let mut consumed_chars = 0;
    while let Some(start) = rest.find('<') {
        let after = &rest[start + 1..];
        let kind_len = after
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let tag = (kind_len > 0 && after[kind_len..].starts_with(':'))
            .then(|| after[kind_len + 1..].find('>').map(|end| (kind_len, end)))
            .flatten()
            .filter(|&(_, end)| end > 0);
        let head = &rest[..start];
        text.push_str(head);
        let position = consumed_chars + head.chars().count() + 1;
        match tag {
            Some((kind_len, end)) => {
                let body = &after[kind_len + 1..kind_len + 1 + end];
                tags.push(ExtraNetwork {
                    kind: after[..kind_len].to_string(),
                    args: body.split(':').map(str::to_string).collect(),
                    position,
                });
                let tag_len = 1 + kind_len + 1 + end + 1;
                consumed_chars +=
                    head.chars().count() + rest[start..start + tag_len].chars().count();
                rest = &rest[start + tag_len..];
            }
            None => {
                text.push('<');
                consumed_chars += head.chars().count() + 1;
                rest = &rest[start + 1..];
            }
        }
    }
    text.push_str(rest);
    (text, tags)
}
