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
//! Numbers are decimals (`rust_decimal`, 28 significant digits), not binary floats, so `+ - *`
//! are exact (`1234567890.123 * 100000` is `123456789012300`, where f64 printed
//! `123456789012299.984375`) and a quotient is exact to 28 digits before it is rounded to the
//! 6 decimals an answer shows. Limits keep a bad call cheap: 200 characters, 32 levels of
//! nesting, magnitudes up to 1e15.

use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;

const MAX_LEN: usize = 200;
const MAX_DEPTH: usize = 32;
const MAX_MAGNITUDE: i64 = 1_000_000_000_000_000;

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

/// Integers as integers; other values rounded to 6 decimals (half to even), trailing zeros dropped.
fn format_number(x: Decimal) -> String {
    let rounded = x.round_dp(6).normalize();
    if rounded.is_zero() { "0".into() } else { rounded.to_string() }
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

    fn expr(&mut self) -> Result<Decimal, String> {
        let mut value = self.term()?;
        while let Some(op @ (b'+' | b'-')) = self.peek() {
            self.at += 1;
            let rhs = self.term()?;
            value = checked(if op == b'+' { value.checked_add(rhs) } else { value.checked_sub(rhs) })?;
        }
        Ok(value)
    }

    fn term(&mut self) -> Result<Decimal, String> {
        let mut value = self.factor()?;
        while let Some(op @ (b'*' | b'/')) = self.peek() {
            self.at += 1;
            let rhs = self.factor()?;
            value = checked(if op == b'*' {
                value.checked_mul(rhs)
            } else if rhs.is_zero() {
                return Err("division by zero".into());
            } else {
                value.checked_div(rhs)
            })?;
        }
        Ok(value)
    }

    fn factor(&mut self) -> Result<Decimal, String> {
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

    fn number(&mut self) -> Result<Decimal, String> {
        let start = self.at;
        while self.at < self.s.len() && (self.s[self.at].is_ascii_digit() || self.s[self.at] == b'.') {
            self.at += 1;
        }
        let text = std::str::from_utf8(&self.s[start..self.at]).unwrap_or_default();
        if text.bytes().filter(|&b| b == b'.').count() > 1 || text.ends_with('.') {
            return Err(format!("`{text}` is not a number"));
        }
        // Digits beyond what a decimal holds (28) are rounded away: past the magnitude limit,
        // or decimals finer than any answer shows.
        let value = Decimal::from_str_exact(text).or_else(|_| text.parse::<Decimal>()).map_err(|_| format!("`{text}` is not a number"))?;
        checked(Some(value))
    }
}

/// `x` if it was computed (no overflow) and is within the magnitude limit.
fn checked(x: Option<Decimal>) -> Result<Decimal, String> {
    match x {
        Some(x) if x.abs().to_i64().is_some_and(|i| i < MAX_MAGNITUDE) || x.abs() == Decimal::from(MAX_MAGNITUDE) => Ok(x),
        _ => Err("number too large (the limit is 1e15)".into()),
    }
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
            // Exact where binary floats are not.
            ("1234567890.123 * 100000", "123456789012300"),
            ("0.1 * 3", "0.3"),
            ("123456789.123456 + 0.000001", "123456789.123457"),
            ("2 / 3", "0.666667"),
            ("-0.0000001", "0"),
            ("1 / 3 * 3", "1"),
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
