//! The `calculator` tool: arithmetic on decimal numbers with `+ - * /`, unary minus and
//! parentheses, by a recursive-descent parser of this grammar only (never an evaluator of code):
//!
//! ```text
//! expr   := term (("+" | "-") term)*
//! term   := factor (("*" | "/") factor)*
//! factor := ("-" | "+") factor | number | "(" expr ")"
//! number := digits ("." digits)?
//! ```
//!
//! Limits keep a bad call cheap and its answer exact: 200 characters, 32 levels of nesting,
//! magnitudes up to 1e15 (integers in f64 are exact to 2^53).

const MAX_LEN: usize = 200;
const MAX_DEPTH: usize = 32;
const MAX_MAGNITUDE: f64 = 1e15;

/// Evaluates `input`; the error says what is wrong, for the model to read.
pub fn evaluate(input: &str) -> Result<String, String> {
    if input.len() > MAX_LEN {
        return Err(format!("expression longer than {MAX_LEN} characters"));
    }
    let mut p = Parser { s: input.as_bytes(), at: 0, depth: 0 };
    let value = p.expr()?;
    p.skip_spaces();
    if p.at < p.s.len() {
        return Err(format!("unexpected `{}` at position {}", p.s[p.at] as char, p.at + 1));
    }
    Ok(format_number(value))
}

/// Integers as integers; other values to 6 decimals, trailing zeros dropped.
fn format_number(x: f64) -> String {
    if x.fract() == 0.0 {
        return format!("{}", x as i64);
    }
    let s = format!("{x:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.into() }
}

struct Parser<'a> {
    s: &'a [u8],
    at: usize,
    depth: usize,
}

impl Parser<'_> {
    fn skip_spaces(&mut self) {
        while self.at < self.s.len() && self.s[self.at].is_ascii_whitespace() {
            self.at += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_spaces();
        self.s.get(self.at).copied()
    }

    fn expr(&mut self) -> Result<f64, String> {
        let mut value = self.term()?;
        while let Some(op @ (b'+' | b'-')) = self.peek() {
            self.at += 1;
            let rhs = self.term()?;
            value = checked(if op == b'+' { value + rhs } else { value - rhs })?;
        }
        Ok(value)
    }

    fn term(&mut self) -> Result<f64, String> {
        let mut value = self.factor()?;
        while let Some(op @ (b'*' | b'/')) = self.peek() {
            self.at += 1;
            let rhs = self.factor()?;
            value = checked(if op == b'*' {
                value * rhs
            } else if rhs == 0.0 {
                return Err("division by zero".into());
            } else {
                value / rhs
            })?;
        }
        Ok(value)
    }

    fn factor(&mut self) -> Result<f64, String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(format!("nested deeper than {MAX_DEPTH} levels"));
        }
        let value = match self.peek() {
            Some(b'-') => {
                self.at += 1;
                -self.factor()?
            }
            Some(b'+') => {
                self.at += 1;
                self.factor()?
            }
            Some(b'(') => {
                self.at += 1;
                let v = self.expr()?;
                if self.peek() != Some(b')') {
                    return Err("missing `)`".into());
                }
                self.at += 1;
                v
            }
            Some(c) if c.is_ascii_digit() => self.number()?,
            Some(c) => return Err(format!("unexpected `{}` at position {}", c as char, self.at + 1)),
            None => return Err("the expression ends early".into()),
        };
        self.depth -= 1;
        Ok(value)
    }

    fn number(&mut self) -> Result<f64, String> {
        let start = self.at;
        while self.at < self.s.len() && (self.s[self.at].is_ascii_digit() || self.s[self.at] == b'.') {
            self.at += 1;
        }
        let text = std::str::from_utf8(&self.s[start..self.at]).unwrap_or_default();
        let value: f64 = text.parse().map_err(|_| format!("`{text}` is not a number"))?;
        checked(value)
    }
}

fn checked(x: f64) -> Result<f64, String> {
    if x.is_finite() && x.abs() <= MAX_MAGNITUDE { Ok(x) } else { Err("number too large (the limit is 1e15)".into()) }
}

#[cfg(test)]
mod tests {
    use super::evaluate;

    #[test]
    fn arithmetic_follows_precedence_and_parentheses() {
        for (input, want) in [
            ("12 * 7", "84"),
            ("2026 - 1989", "37"),
            ("1 + 2 * 3", "7"),
            ("(1 + 2) * 3", "9"),
            ("10 / 4", "2.5"),
            ("1 / 3", "0.333333"),
            ("-3 + 5", "2"),
            ("- (2 - 5)", "3"),
            ("8 / 2 / 2", "2"),
            ("10 - 2 - 3", "5"),
            ("0.1 + 0.2", "0.3"),
            ("999999999999999", "999999999999999"),
        ] {
            assert_eq!(evaluate(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn bad_expressions_are_errors_not_crashes() {
        for (input, needle) in [
            ("1 / 0", "division by zero"),
            ("5 / (2 - 2)", "division by zero"),
            ("99999999 * 99999999", "too large"),
            ("1e400", "unexpected `e`"),
            ("2 ^ 8", "unexpected `^`"),
            ("(1 + 2", "missing `)`"),
            ("1 +", "ends early"),
            ("", "ends early"),
            ("1.2.3", "not a number"),
            ("import os", "unexpected `i`"),
            ("3 4", "unexpected `4`"),
        ] {
            let err = evaluate(input).unwrap_err();
            assert!(err.contains(needle), "{input}: {err}");
        }
        assert!(evaluate(&"(".repeat(40)).unwrap_err().contains("nested"));
        assert!(evaluate(&"1+".repeat(150)).unwrap_err().contains("longer than"));
    }
}
