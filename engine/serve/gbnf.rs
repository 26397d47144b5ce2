//! GBNF, llama.cpp's grammar format (and the EBNF of vLLM's default `guided_grammar` backend), converted to the
//! Lark dialect of llguidance, the grammar engine here. vLLM's llguidance backend does the same conversion.
//!
//! The syntax is llama.cpp's (`grammars/README.md` there):
//! - `name ::= alternatives`, one rule a line; a rule continues on the next line only inside parentheses or after
//!   a `|`. Names are letters, digits, `-` and (as xgrammar, vLLM's default, allows) `_`. Generation starts at
//!   `root`.
//! - Terminals: `"literal"`, character classes `[a-z]` and `[^...]`, and `.` for any character. Literals and
//!   classes take the escapes `\x41`, `\u0041`, `\U00000041`, `\t`, `\n`, `\r`, `\\`, `\"`, `\[`, `\]` and `\-`.
//! - Grouping `( )`, alternatives `|`, and the repetitions `*`, `+`, `?`, `{m}`, `{m,}` and `{m,n}`.
//! - `#` starts a comment that runs to the end of the line.
//!
//! llama.cpp's newer token references (`<[1000]>`, `<think>`, `!<...>`) are refused by name. A rule defined twice,
//! a reference to an undefined rule, and a grammar without `root` are errors (llama.cpp too refuses the last two),
//! as are empty classes (`[]`, `[^]`), reversed ranges (`[z-a]`) and counts past llguidance's `i32`.
//!
//! One difference remains, the one every llguidance user has: literals and classes become llguidance lexemes, and
//! a lexeme that could still grow is not cut short for a shorter alternative. `("a" | "ab") "b"` does not match
//! `ab`.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

/// Whether `grammar` is GBNF rather than Lark: its first definition (past blank lines and comments) is a name
/// and `::=`.
pub fn is_gbnf(grammar: &str) -> bool {
    grammar
        .split(['\n', '\r'])
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("//"))
        .is_some_and(|l| l.trim_start_matches(is_word_char).trim_start().starts_with("::="))
}

/// The Lark form of the GBNF grammar `src`, or an error that gives the line and column at fault.
pub fn to_lark(src: &str) -> Result<String, String> {
    let rules = Parser { src, pos: 0, depth: 0 }.grammar()?;
    emit(src, &rules)
}

/// One element of a sequence.
#[derive(Debug)]
enum Item {
    /// A literal string.
    Lit(String),
    /// A character class: `negated`, and inclusive ranges of characters.
    Class { negated: bool, ranges: Vec<(char, char)> },
    /// Any one character.
    Any,
    /// A reference to a rule, with its byte offset in the source.
    Ref(String, usize),
    /// A parenthesized group of alternatives.
    Group(Vec<Vec<Item>>),
    /// A repeated item.
    Repeat(Box<Item>, Repeat),
}

/// A repetition operator.
#[derive(Clone, Copy, Debug)]
enum Repeat {
    Star,
    Plus,
    Optional,
    /// `{min}`, `{min,}` (no max) or `{min,max}`.
    Range(u32, Option<u32>),
}

/// A rule: its name, the byte offset of its definition, and its alternatives.
struct Rule {
    name: String,
    at: usize,
    alts: Vec<Vec<Item>>,
}

/// How deep groups (and repetitions of repetitions, which become groups) may nest: llguidance's own limit for Lark
/// (30 levels, of which the rule and its body take two).
const MAX_NESTING: usize = 28;

/// The largest repetition count: llguidance reads counts as `i32` and takes `i32::MAX` for "no maximum".
const MAX_COUNT: u32 = i32::MAX as u32 - 1;

struct Parser<'a> {
    src: &'a str,
    pos: usize,
    /// Groups open at `pos`.
    depth: usize,
}

/// How deep `item` nests in its Lark form.
fn nesting(item: &Item) -> usize {
    match item {
        Item::Group(alts) => 1 + alts.iter().flatten().map(nesting).max().unwrap_or(0),
        Item::Repeat(inner, _) => nesting(inner) + usize::from(matches!(**inner, Item::Repeat(..))),
        _ => 0,
    }
}

/// A character of a rule name: llama.cpp's letters, digits and `-`, and xgrammar's `_` (vLLM's examples use it).
fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.src[self.pos..].chars().next()
    }

    fn peek2(&self) -> Option<char> {
        self.src[self.pos..].chars().nth(1)
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn error(&self, at: usize, what: impl std::fmt::Display) -> String {
        located(self.src, at, what)
    }

    /// Skips spaces, tabs and comments, and line ends too when `newlines`.
    fn space(&mut self, newlines: bool) {
        while let Some(c) = self.peek() {
            match c {
                ' ' | '\t' => self.pos += 1,
                '\r' | '\n' if newlines => self.pos += 1,
                '#' => {
                    while self.peek().is_some_and(|c| c != '\n' && c != '\r') {
                        self.bump();
                    }
                }
                _ => break,
            }
        }
    }

    fn grammar(mut self) -> Result<Vec<Rule>, String> {
        let mut rules = Vec::new();
        self.space(true);
        while self.peek().is_some() {
            rules.push(self.rule()?);
        }
        Ok(rules)
    }

    fn name(&mut self) -> Result<String, String> {
        let start = self.pos;
        while self.peek().is_some_and(is_word_char) {
            self.pos += 1;
        }
        if self.pos == start {
            let found = self.peek().map_or("the end".to_string(), |c| format!("{c:?}"));
            return Err(self.error(start, format!("expecting a rule name, found {found}")));
        }
        Ok(self.src[start..self.pos].to_string())
    }

    fn rule(&mut self) -> Result<Rule, String> {
        let at = self.pos;
        let name = self.name()?;
        self.space(false);
        if !self.src[self.pos..].starts_with("::=") {
            return Err(self.error(self.pos, format!("expecting `::=` after the rule name `{name}`")));
        }
        self.pos += 3;
        self.space(true);
        let alts = self.alternates(false)?;
        match self.peek() {
            None => {}
            Some('\r' | '\n') => self.space(true),
            Some(c) => return Err(self.error(self.pos, format!("expecting a line end, found {c:?}"))),
        }
        Ok(Rule { name, at, alts })
    }

    fn alternates(&mut self, nested: bool) -> Result<Vec<Vec<Item>>, String> {
        let mut alts = vec![self.sequence(nested)?];
        while self.peek() == Some('|') {
            self.pos += 1;
            self.space(true);
            alts.push(self.sequence(nested)?);
        }
        Ok(alts)
    }

    /// One escaped or plain character of a literal or class.
    fn char(&mut self) -> Result<char, String> {
        let at = self.pos;
        let c = self.bump().ok_or_else(|| self.error(at, "unexpected end of the grammar"))?;
        if c != '\\' {
            return Ok(c);
        }
        let e = self.bump().ok_or_else(|| self.error(at, "unexpected end of the grammar after `\\`"))?;
        let digits = match e {
            'x' => 2,
            'u' => 4,
            'U' => 8,
            't' => return Ok('\t'),
            'n' => return Ok('\n'),
            'r' => return Ok('\r'),
            '\\' | '"' | '[' | ']' | '-' => return Ok(e),
            other => return Err(self.error(at, format!("unknown escape `\\{other}`"))),
        };
        let hex = self.src.get(self.pos..self.pos + digits).filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
        let code = hex
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .ok_or_else(|| self.error(at, format!("`\\{e}` takes {digits} hex digits")))?;
        self.pos += digits;
        char::from_u32(code).ok_or_else(|| self.error(at, format!("`\\{e}{code:X}` is not a Unicode character")))
    }

    fn number(&mut self) -> Result<u32, String> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.error(start, "expecting a number"));
        }
        self.src[start..self.pos]
            .parse()
            .ok()
            .filter(|&n| n <= MAX_COUNT)
            .ok_or_else(|| self.error(start, format!("the number is too large (at most {MAX_COUNT})")))
    }

    fn sequence(&mut self, nested: bool) -> Result<Vec<Item>, String> {
        let mut items: Vec<Item> = Vec::new();
        while let Some(c) = self.peek() {
            let at = self.pos;
            let item = match c {
                '"' => {
                    self.pos += 1;
                    let mut s = String::new();
                    loop {
                        match self.peek() {
                            None => return Err(self.error(at, "the literal is not closed")),
                            Some('"') => break,
                            Some(_) => s.push(self.char()?),
                        }
                    }
                    self.pos += 1;
                    Item::Lit(s)
                }
                '[' => {
                    self.pos += 1;
                    let negated = self.peek() == Some('^');
                    if negated {
                        self.pos += 1;
                    }
                    let mut ranges = Vec::new();
                    loop {
                        match self.peek() {
                            None => return Err(self.error(at, "the character class is not closed")),
                            Some(']') => break,
                            Some(_) => {
                                let lo_at = self.pos;
                                let lo = self.char()?;
                                let hi = if self.peek() == Some('-') && self.peek2().is_some_and(|c| c != ']') {
                                    self.pos += 1;
                                    self.char()?
                                } else {
                                    lo
                                };
                                if hi < lo {
                                    return Err(self.error(lo_at, format!("the range {lo:?}-{hi:?} is reversed")));
                                }
                                ranges.push((lo, hi));
                            }
                        }
                    }
                    self.pos += 1;
                    if ranges.is_empty() {
                        return Err(self.error(at, "an empty character class (`[]` or `[^]`) is not supported"));
                    }
                    Item::Class { negated, ranges }
                }
                '.' => {
                    self.pos += 1;
                    Item::Any
                }
                '(' => {
                    if self.depth >= MAX_NESTING {
                        return Err(self.error(at, format!("groups nest more than {MAX_NESTING} deep")));
                    }
                    self.pos += 1;
                    self.depth += 1;
                    self.space(true);
                    let alts = self.alternates(true)?;
                    self.depth -= 1;
                    if self.peek() != Some(')') {
                        return Err(
                            self.error(self.pos, format!("expecting `)` to close the group at {}", pos(self.src, at)))
                        );
                    }
                    self.pos += 1;
                    Item::Group(alts)
                }
                '<' | '!' => {
                    return Err(self.error(at, "token references (`<...>`, `!<...>`) are not supported"));
                }
                '*' | '+' | '?' | '{' => {
                    let last =
                        items.pop().ok_or_else(|| self.error(at, format!("`{c}` must follow the item it repeats")))?;
                    self.pos += 1;
                    let op = match c {
                        '*' => Repeat::Star,
                        '+' => Repeat::Plus,
                        '?' => Repeat::Optional,
                        _ => {
                            self.space(nested);
                            let min = self.number()?;
                            self.space(nested);
                            let max = match self.bump() {
                                Some('}') => Some(min),
                                Some(',') => {
                                    self.space(nested);
                                    let max = if self.peek().is_some_and(|c| c.is_ascii_digit()) {
                                        let max_at = self.pos;
                                        let max = self.number()?;
                                        if max < min {
                                            return Err(self.error(
                                                max_at,
                                                format!("{{{min},{max}}}: the maximum is below the minimum"),
                                            ));
                                        }
                                        self.space(nested);
                                        Some(max)
                                    } else {
                                        None
                                    };
                                    if self.bump() != Some('}') {
                                        return Err(self.error(at, "expecting `}` to close the repetition"));
                                    }
                                    max
                                }
                                _ => return Err(self.error(at, "expecting `,` or `}` in the repetition")),
                            };
                            Repeat::Range(min, max)
                        }
                    };
                    let item = Item::Repeat(Box::new(last), op);
                    if self.depth + nesting(&item) > MAX_NESTING {
                        return Err(self.error(at, format!("repetitions and groups nest more than {MAX_NESTING} deep")));
                    }
                    item
                }
                c if is_word_char(c) => {
                    let name = self.name()?;
                    Item::Ref(name, at)
                }
                _ => break,
            };
            items.push(item);
            self.space(nested);
        }
        Ok(items)
    }
}

/// `line L, column C` of byte offset `at` in `src` (columns count characters, from 1).
fn pos(src: &str, at: usize) -> String {
    let before = &src[..at.min(src.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {col}")
}

fn located(src: &str, at: usize, what: impl std::fmt::Display) -> String {
    format!("GBNF {}: {what}", pos(src, at))
}

/// Lark names for the GBNF names: `root` is `start`; the rest are lowercased (a leading non-letter gets `r-`), and
/// a name two GBNF names would share gets a numbered suffix.
fn lark_names(rules: &[Rule]) -> HashMap<&str, String> {
    let mut taken: HashSet<String> = HashSet::from(["start".to_string()]);
    // The next suffix to try for each base, so that many names sharing a base cost linear time.
    let mut next: HashMap<String, usize> = HashMap::new();
    let mut names: HashMap<&str, String> = HashMap::from([("root", "start".to_string())]);
    for r in rules {
        if names.contains_key(r.name.as_str()) {
            continue;
        }
        let mut base = r.name.to_ascii_lowercase();
        if !base.starts_with(|c: char| c.is_ascii_lowercase()) {
            base.insert_str(0, "r-");
        }
        let mut name = base.clone();
        let n = next.entry(base.clone()).or_insert(1);
        while taken.contains(&name) {
            name = format!("{base}-{n}");
            *n += 1;
        }
        taken.insert(name.clone());
        names.insert(&r.name, name);
    }
    names
}

fn emit(src: &str, rules: &[Rule]) -> Result<String, String> {
    let mut defined: HashMap<&str, usize> = HashMap::new();
    for r in rules {
        if let Some(first) = defined.insert(&r.name, r.at) {
            return Err(located(
                src,
                r.at,
                format!("the rule `{}` is defined twice (first at {})", r.name, pos(src, first)),
            ));
        }
    }
    if !defined.contains_key("root") {
        return Err("GBNF: the grammar has no `root` rule, where generation starts".into());
    }
    let names = lark_names(rules);
    let mut out = String::new();
    for r in rules {
        out.push_str(&names[r.name.as_str()]);
        out.push_str(": ");
        alternates(src, &names, &r.alts, &mut out)?;
        out.push('\n');
    }
    Ok(out)
}

fn alternates(src: &str, names: &HashMap<&str, String>, alts: &[Vec<Item>], out: &mut String) -> Result<(), String> {
    for (i, seq) in alts.iter().enumerate() {
        if i > 0 {
            out.push_str(" | ");
        }
        if seq.is_empty() {
            out.push_str("\"\"");
        }
        for (j, item) in seq.iter().enumerate() {
            if j > 0 {
                out.push(' ');
            }
            self::item(src, names, item, out)?;
        }
    }
    Ok(())
}

fn item(src: &str, names: &HashMap<&str, String>, item: &Item, out: &mut String) -> Result<(), String> {
    match item {
        Item::Lit(s) => lark_string(s, out),
        Item::Class { negated, ranges } => {
            out.push_str(if *negated { "/[^" } else { "/[" });
            for &(lo, hi) in ranges {
                class_char(lo, out);
                if hi != lo {
                    out.push('-');
                    class_char(hi, out);
                }
            }
            out.push_str("]/");
        }
        Item::Any => out.push_str("/(?s:.)/"),
        Item::Ref(name, at) => match names.get(name.as_str()) {
            Some(n) => out.push_str(n),
            None => return Err(located(src, *at, format!("the rule `{name}` is not defined"))),
        },
        Item::Group(alts) => {
            out.push('(');
            alternates(src, names, alts, out)?;
            out.push(')');
        }
        Item::Repeat(_, Repeat::Range(_, Some(0))) => out.push_str("\"\""),
        Item::Repeat(inner, op) => {
            // Lark takes one operator an item: a repeated repetition is grouped first.
            let wrap = matches!(**inner, Item::Repeat(..));
            if wrap {
                out.push('(');
            }
            self::item(src, names, inner, out)?;
            if wrap {
                out.push(')');
            }
            match op {
                Repeat::Star => out.push('*'),
                Repeat::Plus => out.push('+'),
                Repeat::Optional => out.push('?'),
                Repeat::Range(min, Some(max)) if min == max => {
                    let _ = write!(out, "{{{min}}}");
                }
                Repeat::Range(min, Some(max)) => {
                    let _ = write!(out, "{{{min},{max}}}");
                }
                Repeat::Range(min, None) => {
                    let _ = write!(out, "{{{min},}}");
                }
            }
        }
    }
    Ok(())
}

/// A Lark string literal (JSON's escapes; the control characters and DEL as `\u00XX`).
fn lark_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A character inside a regex class: letters and digits as they are, the rest as `\x{...}`.
fn class_char(c: char, out: &mut String) {
    if c.is_ascii_alphanumeric() {
        out.push(c);
    } else {
        let _ = write!(out, "\\x{{{:x}}}", c as u32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llguidance::api::TopLevelGrammar;
    use llguidance::toktrie::ApproximateTokEnv;
    use llguidance::{Matcher, ParserFactory};

    /// Whether the Lark form of `gbnf` accepts `text` whole, on a one-byte-a-token vocabulary.
    fn accepts(gbnf: &str, text: &str) -> bool {
        let lark = to_lark(gbnf).unwrap_or_else(|e| panic!("{gbnf:?}: {e}"));
        let factory = ParserFactory::new_simple(&ApproximateTokEnv::single_byte_env()).expect("factory");
        let parser = factory
            .create_parser(TopLevelGrammar::from_lark(lark.clone()))
            .unwrap_or_else(|e| panic!("{gbnf:?} as {lark:?}: {e}"));
        let mut m = Matcher::new(Ok(parser));
        assert!(m.get_error().is_none(), "{lark:?}: {:?}", m.get_error());
        let ids: Vec<u32> = text.bytes().map(u32::from).collect();
        m.validate_tokens(&ids).is_ok_and(|n| n == ids.len())
            && m.consume_tokens(&ids).is_ok()
            && m.is_accepting().unwrap_or(false)
    }

    fn check(gbnf: &str, yes: &[&str], no: &[&str]) {
        for t in yes {
            assert!(accepts(gbnf, t), "{gbnf:?} should accept {t:?} (as {:?})", to_lark(gbnf));
        }
        for t in no {
            assert!(!accepts(gbnf, t), "{gbnf:?} should refuse {t:?} (as {:?})", to_lark(gbnf));
        }
    }

    #[test]
    fn tells_gbnf_from_lark() {
        assert!(is_gbnf("# a comment\n\nroot ::= \"a\""));
        assert!(!is_gbnf("start: \"a ::= b\"\n"));
        assert!(!is_gbnf("// x ::= y\nstart: \"a\""));
        assert!(!is_gbnf(""));
        assert!(is_gbnf("# a comment\rroot ::= \"a\""));
        assert!(is_gbnf("select_statement ::= \"SELECT\"\nroot ::= select_statement"));
    }

    #[test]
    fn literals_classes_and_any() {
        check(r#"root ::= "yes" | "no""#, &["yes", "no"], &["", "y", "yesno", "maybe"]);
        check(r#"root ::= [a-c] [^a-c\n] ."#, &["ax!", "cz\t"], &["aa!", "a\n!", "dx!", "ax"]);
        check(r#"root ::= "\x41\u0042\U00000043\t\"\\""#, &["ABC\t\"\\"], &["ABC"]);
        check(r#"root ::= [\]\[\-] [-a] [a-]"#, &["]-a", "[a-", "-aa"], &["a-a"]);
        check("root ::= \"caf\u{e9}\" [\u{e0}-\u{ff}]", &["caf\u{e9}\u{e8}"], &["cafe\u{e8}", "caf\u{e9}e"]);
        check("root ::= \"\" \"x\"", &["x"], &[""]);
    }

    #[test]
    fn repetitions_groups_and_rules() {
        check("root ::= [0-9]{3} \"-\" [0-9]{2,4}", &["123-45", "123-4567"], &["12-45", "123-4", "123-45678"]);
        check("root ::= \"a\"{2,} \"b\"{0} \"c\"{ 1 , }", &["aac", "aaaacc"], &["ac", "aabc"]);
        check("root ::= (\"ab\" | \"c\")* \"d\"?", &["", "ababc", "cd", "d"], &["a", "dd"]);
        check("root ::= \"x\"+? \"y\"*+", &["", "xx", "xyy"], &["yx"]);
        let json_list = r#"
            # a list of numbers
            root   ::= "[" ws ( number ( "," ws number )* )? "]"
            number ::= "-"? [1-9] [0-9]* | "0"   # no leading zeros
            ws     ::= [ \t\n]*
        "#;
        check(json_list, &["[]", "[ 1,2, -30]", "[\n0]"], &["[01]", "[1,]", "[", "[ 1 2]"]);
        // A rule may continue on the next line inside parentheses and after `|`.
        let multi = "root ::= (\n  \"a\"\n  \"b\" |\n  \"c\"\n) tail-rule\ntail-rule ::= \"!\" |\n  \"?\"\n";
        check(multi, &["ab!", "c?"], &["a!", "ab"]);
        // Recursion, and names that Lark spells differently.
        check(
            "root ::= Expr\nExpr ::= \"(\" Expr \")\" | 1x\n1x ::= \"x\"\nstart ::= \"s\"",
            &["x", "((x))"],
            &["(x", "s"],
        );
    }

    /// The documented difference from llama.cpp: a lexeme that can still grow is not cut short.
    #[test]
    fn lexemes_are_greedy() {
        check(r#"root ::= ("a" | "ab") "b""#, &["abb"], &["ab"]);
    }

    /// As deep as llguidance takes, and vLLM's example SQL grammar (names with `_`).
    #[test]
    fn limits_and_vllm_names() {
        check(&format!("root ::= {}\"a\"{}", "(".repeat(MAX_NESTING), ")".repeat(MAX_NESTING)), &["a"], &["b"]);
        check(&format!("root ::= \"a\"{}", "?*".repeat(MAX_NESTING / 2) + "?"), &["", "aa"], &["b"]);
        // Groups and repetitions inside them count together.
        let (open, close) = ("(".repeat(MAX_NESTING - 1), ")".repeat(MAX_NESTING - 1));
        check(&format!("root ::= {open}\"a\"**{close}"), &["", "aaa"], &["b"]);
        let e = to_lark(&format!("root ::= {open}\"a\"***{close}")).unwrap_err();
        assert!(e.contains("repetitions and groups nest more than 28 deep"), "{e}");
        let sql = "root ::= select_statement\nselect_statement ::= \"SELECT \" column \" from \" table\n\
                   column ::= \"col_1 \" | \"col_2 \"\ntable ::= \"table_1 \" | \"table_2 \"\n";
        check(sql, &["SELECT col_1  from table_2 "], &["SELECT col_3  from table_2 "]);
        // Many names that differ only in case take linear time (each gets the next free suffix).
        let mut g = String::from("root ::= \"x\"\n");
        for i in 0..20_000u32 {
            let name: String = (0..15).map(|b| if i >> b & 1 == 1 { 'A' } else { 'a' }).collect();
            g.push_str(&format!("{name} ::= \"\"\n"));
        }
        let t = std::time::Instant::now();
        let lark = to_lark(&g).unwrap();
        assert!(lark.contains("aaaaaaaaaaaaaaa-19999:"), "{}", &lark[lark.len() - 200..]);
        assert!(t.elapsed() < std::time::Duration::from_secs(2), "{:?}", t.elapsed());
    }

    #[test]
    fn names_stay_distinct() {
        let lark = to_lark("root ::= A a a-1 2\nA ::= \"1\"\na ::= \"2\"\na-1 ::= \"3\"\n2 ::= \"4\"\n").unwrap();
        assert_eq!(lark, "start: a a-1 a-1-1 r-2\na: \"1\"\na-1: \"2\"\na-1-1: \"3\"\nr-2: \"4\"\n");
        check("root ::= A a a-1 2\nA ::= \"1\"\na ::= \"2\"\na-1 ::= \"3\"\n2 ::= \"4\"\n", &["1234"], &["1243"]);
    }

    #[test]
    fn errors_name_the_place() {
        for (g, says) in [
            ("root ::= \"a\"\nroot ::= \"b\"", "line 2, column 1: the rule `root` is defined twice (first at line 1"),
            ("root ::= item", "line 1, column 10: the rule `item` is not defined"),
            ("item ::= \"a\"", "no `root` rule"),
            ("root = \"a\"", "line 1, column 6: expecting `::=`"),
            ("root ::= \"a", "line 1, column 10: the literal is not closed"),
            ("root ::= [a-", "the character class is not closed"),
            ("root ::= []", "empty character class"),
            ("root ::= [^]", "empty character class"),
            ("root ::= [z-a]", "the range 'z'-'a' is reversed"),
            ("root ::= ( \"a\"", "expecting `)` to close the group at line 1, column 10"),
            ("root ::= * \"a\"", "`*` must follow the item it repeats"),
            ("root ::= \"a\"{3,2}", "the maximum is below the minimum"),
            ("root ::= \"a\"{x}", "expecting a number"),
            ("root ::= \"a\"{99999999999}", "too large"),
            ("root ::= \"a\"{0,2147483647}", "at most 2147483646"),
            ("root ::= \"\\q\"", "unknown escape `\\q`"),
            ("root ::= \"\\u12\"", "`\\u` takes 4 hex digits"),
            ("root ::= \"\\UFFFFFFFF\"", "not a Unicode character"),
            ("root ::= <think> \"a\"", "token references"),
            ("root ::= \"a\" \"b\"\n  \"c\"", "line 2, column 3: expecting a rule name"),
            ("root ::= \"a\" ) \"b\"", "line 1, column 14: expecting a line end, found ')'"),
            (&format!("root ::= {}\"a\"{}", "(".repeat(100_000), ")".repeat(100_000)), "column 38: groups nest more"),
            (&format!("root ::= \"a\"{}", "*".repeat(100_000)), "column 42: repetitions and groups nest more"),
        ] {
            let e = to_lark(g).expect_err(g);
            assert!(e.contains(says), "{g:?}: {e}");
        }
    }
}
