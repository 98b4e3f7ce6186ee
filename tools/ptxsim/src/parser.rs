//! PTX text -> a syntax tree of directives and statements. Knows only the grammar (what nvcc 13 emits for sm_80 and
//! sm_90a, plus hand-written inline asm); meaning is given by `decode`.

use crate::ParseError;

#[derive(Clone, Debug, PartialEq)]
pub enum Tok {
    /// Identifiers, opcodes with modifiers, registers, directives, labels: `ld.global.v4.u32`, `%r1`, `$L__BB0_5`.
    Word(String),
    /// Numeric literal text as written: `12`, `0x1F`, `0f3F800000`, `1.0`.
    Num(String),
    Punct(char),
    Str(String),
}

#[derive(Clone, Debug)]
struct Token {
    tok: Tok,
    line: u32,
}

fn lex(src: &str) -> Result<Vec<Token>, ParseError> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0usize, 1u32);
    let word_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '$' | '%');
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && chars.get(i + 1) == Some(&'/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && chars.get(i + 1) == Some(&'*') {
            i += 2;
            while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                if chars[i] == '\n' {
                    line += 1;
                }
                i += 1;
            }
            i += 2;
        } else if c == '"' {
            let start = i + 1;
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += 1;
            }
            out.push(Token { tok: Tok::Str(chars[start..i.min(chars.len())].iter().collect()), line });
            i += 1;
        } else if c.is_ascii_digit() {
            let start = i;
            while i < chars.len() {
                let ch = chars[i];
                let exp_sign = matches!(ch, '+' | '-')
                    && matches!(chars[i - 1], 'e' | 'E')
                    && !chars[start..i].iter().any(|&x| x == 'x' || x == 'X' || x == 'f' || x == 'd');
                if ch.is_ascii_alphanumeric() || ch == '.' || exp_sign {
                    i += 1;
                } else {
                    break;
                }
            }
            out.push(Token { tok: Tok::Num(chars[start..i].iter().collect()), line });
        } else if word_char(c) {
            let start = i;
            while i < chars.len() {
                if word_char(chars[i]) {
                    i += 1;
                } else if chars[i] == ':' && chars.get(i + 1) == Some(&':') {
                    i += 2; // `.L2::cache_hint`, `.shared::cta`
                } else {
                    break;
                }
            }
            out.push(Token { tok: Tok::Word(chars[start..i].iter().collect()), line });
        } else if "{}[]()<>,;:+-|!@=".contains(c) {
            out.push(Token { tok: Tok::Punct(c), line });
            i += 1;
        } else {
            return Err(ParseError { line, message: format!("unexpected character {c:?}") });
        }
    }
    Ok(out)
}

/// One operand as written.
#[derive(Clone, Debug, PartialEq)]
pub enum Operand {
    /// A register, special register or symbol name (told apart by `decode`), with a `+offset` when written `sym+4`.
    Name(String, i64),
    /// `%r|%p`: a result register and a predicate result.
    Pair(String, String),
    /// `!%p`
    Not(String),
    Int(i64),
    /// Float literal: f32 bits from `0fXXXXXXXX`, f64 bits from `0dXXXXXXXXXXXXXXXX` or a decimal literal.
    F32(u32),
    F64(u64),
    /// `_`
    Sink,
    Vector(Vec<Operand>),
    /// `[base+offset]`; base is a register or a symbol, or none for an absolute address.
    Mem(Option<String>, i64),
    /// `[tensorMap, {c0, ..}]`: a tensor map address (register or symbol) and the coordinates (TMA).
    Tensor(String, Vec<Operand>),
}

#[derive(Clone, Debug)]
pub struct Instruction {
    pub line: u32,
    pub guard: Option<(String, bool)>,
    /// Full opcode with modifiers, e.g. `ld.global.v4.u32`.
    pub opcode: String,
    pub operands: Vec<Operand>,
}

/// A variable declaration: `.shared .align 4 .b8 name[128];`, `.reg .b32 %r<10>;`, `.local ...`.
#[derive(Clone, Debug)]
pub struct VarDecl {
    pub line: u32,
    pub space: String,
    pub align: u32,
    pub ty: String,
    pub name: String,
    /// `%r<N>` declares N registers `%r0..%r{N-1}`.
    pub range: Option<u32>,
    /// Element count of `name[N]` (`Some(0)` for `name[]`).
    pub array: Option<u64>,
    pub extern_: bool,
    pub init: Vec<Operand>,
}

#[derive(Clone, Debug)]
pub enum Stmt {
    Inst(Instruction),
    Label(String, u32),
    Decl(VarDecl),
    ScopeOpen,
    ScopeClose,
}

#[derive(Clone, Debug)]
pub struct Function {
    pub name: String,
    pub is_entry: bool,
    pub line: u32,
    pub params: Vec<VarDecl>,
    /// Return values of a `.func`.
    pub rets: Vec<VarDecl>,
    pub body: Vec<Stmt>,
}

#[derive(Clone, Debug, Default)]
pub struct Ast {
    pub globals: Vec<VarDecl>,
    pub functions: Vec<Function>,
}

struct Parser {
    toks: Vec<Token>,
    pos: usize,
}

fn err<T>(line: u32, message: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError { line, message: message.into() })
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|t| &t.tok)
    }
    fn line(&self) -> u32 {
        self.toks.get(self.pos).or(self.toks.last()).map_or(0, |t| t.line)
    }
    fn next(&mut self) -> Result<Tok, ParseError> {
        let t = self.toks.get(self.pos).map(|t| t.tok.clone());
        self.pos += 1;
        t.ok_or_else(|| ParseError { line: self.line(), message: "unexpected end of input".into() })
    }
    fn is_punct(&self, c: char) -> bool {
        self.peek() == Some(&Tok::Punct(c))
    }
    fn eat(&mut self, c: char) -> bool {
        if self.is_punct(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, c: char) -> Result<(), ParseError> {
        let line = self.line();
        match self.next()? {
            Tok::Punct(p) if p == c => Ok(()),
            other => err(line, format!("expected '{c}', found {other:?}")),
        }
    }
    fn word(&mut self) -> Result<String, ParseError> {
        let line = self.line();
        match self.next()? {
            Tok::Word(w) => Ok(w),
            other => err(line, format!("expected a name, found {other:?}")),
        }
    }
    fn number(&mut self) -> Result<i64, ParseError> {
        let line = self.line();
        let neg = self.eat('-');
        match self.next()? {
            Tok::Num(n) => {
                parse_int(&n).map(|v| if neg { v.wrapping_neg() } else { v }).ok_or_else(|| ParseError { line, message: format!("bad integer {n}") })
            }
            other => err(line, format!("expected a number, found {other:?}")),
        }
    }
    /// Skips to the end of the current statement (through the next ';').
    fn skip_statement(&mut self) -> Result<(), ParseError> {
        while !self.eat(';') {
            self.next()?;
        }
        Ok(())
    }
}

pub fn parse_int(text: &str) -> Option<i64> {
    let t = text.trim_end_matches(['U', 'u']);
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok().map(|v| v as i64)
    } else if t.len() > 1 && t.starts_with('0') && t.bytes().all(|b| b.is_ascii_digit()) {
        u64::from_str_radix(&t[1..], 8).ok().map(|v| v as i64)
    } else if let Some(bin) = t.strip_prefix("0b") {
        u64::from_str_radix(bin, 2).ok().map(|v| v as i64)
    } else {
        t.parse::<u64>().ok().map(|v| v as i64)
    }
}

fn parse_number(text: &str, neg: bool, line: u32) -> Result<Operand, ParseError> {
    let bad = || ParseError { line, message: format!("bad numeric literal {text}") };
    let sign32 = if neg { 0x8000_0000u32 } else { 0 };
    let sign64 = if neg { 1u64 << 63 } else { 0 };
    if let Some(h) = text.strip_prefix("0f").or_else(|| text.strip_prefix("0F")) {
        return u32::from_str_radix(h, 16).map(|v| Operand::F32(v ^ sign32)).map_err(|_| bad());
    }
    if let Some(h) = text.strip_prefix("0d").or_else(|| text.strip_prefix("0D")) {
        return u64::from_str_radix(h, 16).map(|v| Operand::F64(v ^ sign64)).map_err(|_| bad());
    }
    let is_hex = text.starts_with("0x") || text.starts_with("0X");
    if !is_hex && (text.contains('.') || text.contains('e') || text.contains('E')) {
        let v: f64 = text.parse().map_err(|_| bad())?;
        return Ok(Operand::F64((if neg { -v } else { v }).to_bits()));
    }
    let v = parse_int(text).ok_or_else(bad)?;
    Ok(Operand::Int(if neg { v.wrapping_neg() } else { v }))
}

impl Parser {
    fn operand(&mut self) -> Result<Operand, ParseError> {
        let line = self.line();
        if self.eat('(') {
            // A call's return-value or argument list.
            let mut items = Vec::new();
            while !self.eat(')') {
                items.push(self.operand()?);
                self.eat(',');
            }
            return Ok(Operand::Vector(items));
        }
        if self.eat('{') {
            let mut items = Vec::new();
            if !self.eat('}') {
                loop {
                    items.push(self.operand()?);
                    if self.eat('}') {
                        break;
                    }
                    self.expect(',')?;
                }
            }
            return Ok(Operand::Vector(items));
        }
        if self.eat('[') {
            let mut base = None;
            let mut offset = 0i64;
            if let Some(Tok::Word(_)) = self.peek() {
                base = Some(self.word()?);
                if self.eat(',') {
                    // `[tensorMap, {c0, c1, ..}]`: a TMA operand.
                    let coords = match self.operand()? {
                        Operand::Vector(v) => v,
                        other => return err(line, format!("expected {{coordinates}} in a tensor operand, found {other:?}")),
                    };
                    self.expect(']')?;
                    return Ok(Operand::Tensor(base.unwrap_or_default(), coords));
                }
            } else {
                offset = self.number()?;
            }
            while !self.eat(']') {
                let line = self.line();
                if self.eat('+') {
                    offset = offset.wrapping_add(self.number()?);
                } else if self.eat('-') {
                    offset = offset.wrapping_sub(self.number()?);
                } else {
                    return err(line, "bad address expression");
                }
            }
            return Ok(Operand::Mem(base, offset));
        }
        if self.eat('!') {
            return Ok(Operand::Not(self.word()?));
        }
        let neg = self.eat('-');
        match self.next()? {
            Tok::Num(n) => parse_number(&n, neg, line),
            Tok::Word(w) if !neg => {
                if self.eat('|') {
                    return Ok(Operand::Pair(w, self.word()?));
                }
                if w == "_" {
                    return Ok(Operand::Sink);
                }
                let mut offset = 0;
                if self.is_punct('+') {
                    self.pos += 1;
                    offset = self.number()?;
                }
                Ok(Operand::Name(w, offset))
            }
            other => err(line, format!("bad operand {other:?}")),
        }
    }

    /// `.space [.align N] [.v2] .type name[<N>|[N]] [= {...}]` after the space word was read.
    fn decl(&mut self, space: String, line: u32, extern_: bool, single: bool) -> Result<Vec<VarDecl>, ParseError> {
        let mut align = 0u32;
        let mut ty = String::new();
        loop {
            match self.peek() {
                Some(Tok::Word(w)) if w == ".align" => {
                    self.pos += 1;
                    align = self.number()? as u32;
                }
                Some(Tok::Word(w)) if w.starts_with('.') => {
                    let w = self.word()?;
                    if !w.starts_with(".v") && w != ".ptr" && !w.starts_with(".global") {
                        ty = w;
                    }
                }
                _ => break,
            }
        }
        let mut decls = Vec::new();
        loop {
            let name = self.word()?;
            let mut d = VarDecl { line, space: space.clone(), align, ty: ty.clone(), name, range: None, array: None, extern_, init: Vec::new() };
            if self.eat('<') {
                d.range = Some(self.number()? as u32);
                self.expect('>')?;
            }
            while self.eat('[') {
                let n = if self.is_punct(']') { 0 } else { self.number()? as u64 };
                self.expect(']')?;
                d.array = Some(d.array.unwrap_or(1).max(1) * n.max(if d.array.is_some() { 1 } else { 0 }));
                if n == 0 {
                    d.array = Some(0);
                }
            }
            if self.eat('=') {
                match self.operand()? {
                    Operand::Vector(v) => d.init = v,
                    single => d.init = vec![single],
                }
            }
            decls.push(d);
            if single || !self.eat(',') {
                break;
            }
        }
        Ok(decls)
    }

    fn params(&mut self) -> Result<Vec<VarDecl>, ParseError> {
        let mut params = Vec::new();
        if !self.eat('(') {
            return Ok(params);
        }
        while !self.eat(')') {
            let line = self.line();
            let space = self.word()?;
            params.extend(self.decl(space, line, false, true)?);
            self.eat(',');
        }
        Ok(params)
    }

    fn body(&mut self) -> Result<Vec<Stmt>, ParseError> {
        self.expect('{')?;
        let mut depth = 1;
        let mut body = Vec::new();
        loop {
            let line = self.line();
            match self.next()? {
                Tok::Punct('{') => {
                    depth += 1;
                    body.push(Stmt::ScopeOpen);
                }
                Tok::Punct('}') => {
                    depth -= 1;
                    if depth == 0 {
                        return Ok(body);
                    }
                    body.push(Stmt::ScopeClose);
                }
                Tok::Punct(';') => {}
                Tok::Punct('@') => {
                    let neg = self.eat('!');
                    let pred = self.word()?;
                    let opcode = self.word()?;
                    body.push(Stmt::Inst(self.instruction(opcode, Some((pred, neg)), line)?));
                }
                Tok::Word(w) if self.is_punct(':') => {
                    self.pos += 1;
                    body.push(Stmt::Label(w, line));
                }
                Tok::Word(w) if matches!(w.as_str(), ".reg" | ".shared" | ".local" | ".const" | ".global" | ".param") => {
                    for d in self.decl(w, line, false, false)? {
                        body.push(Stmt::Decl(d));
                    }
                    self.expect(';')?;
                }
                Tok::Word(w) if w == ".loc" || w == ".file" => {
                    // Debug line info carries no semicolon: skip the rest of this source line.
                    while self.toks.get(self.pos).is_some_and(|t| t.line == line) {
                        self.pos += 1;
                    }
                }
                Tok::Word(w) if w.starts_with('.') => self.skip_statement()?, // .pragma, .maxnreg inside bodies
                Tok::Word(w) => body.push(Stmt::Inst(self.instruction(w, None, line)?)),
                other => return err(line, format!("unexpected {other:?} in function body")),
            }
        }
    }

    fn instruction(&mut self, opcode: String, guard: Option<(String, bool)>, line: u32) -> Result<Instruction, ParseError> {
        let mut operands = Vec::new();
        if !self.eat(';') {
            loop {
                operands.push(self.operand()?);
                if self.eat(';') {
                    break;
                }
                if !self.eat(',') {
                    return err(self.line(), format!("expected ',' or ';' in {opcode}, found {:?}", self.peek()));
                }
            }
        }
        Ok(Instruction { line, guard, opcode, operands })
    }

    fn module(&mut self) -> Result<Ast, ParseError> {
        let mut ast = Ast::default();
        let mut pending_extern = false;
        while self.pos < self.toks.len() {
            let line = self.line();
            let w = match self.next()? {
                Tok::Word(w) => w,
                Tok::Punct(';') => continue,
                other => return err(line, format!("unexpected {other:?} at module level")),
            };
            match w.as_str() {
                ".version" => {
                    self.next()?;
                }
                ".target" => {
                    self.word()?;
                    while self.eat(',') {
                        self.word()?;
                    }
                }
                ".address_size" => {
                    self.number()?;
                }
                ".file" | ".loc" | ".section" => {
                    while self.toks.get(self.pos).is_some_and(|t| t.line == line) {
                        self.pos += 1;
                    }
                }
                ".visible" | ".weak" | ".common" => {}
                ".extern" => pending_extern = true,
                ".entry" | ".func" => {
                    let is_entry = w == ".entry";
                    let rets = if !is_entry && self.is_punct('(') { self.params()? } else { Vec::new() };
                    let name = self.word()?;
                    let params = self.params()?;
                    // Performance directives (.maxntid 128, 1, 1 / .reqntid / .minnctapersm / .noreturn ...).
                    while !self.is_punct('{') && !self.is_punct(';') {
                        self.next()?;
                    }
                    if self.eat(';') {
                        pending_extern = false;
                        continue; // a prototype
                    }
                    let body = self.body()?;
                    ast.functions.push(Function { name, is_entry, line, params, rets, body });
                    pending_extern = false;
                }
                ".global" | ".const" | ".shared" => {
                    ast.globals.extend(self.decl(w, line, pending_extern, false)?);
                    self.expect(';')?;
                    pending_extern = false;
                }
                other => return err(line, format!("unknown module directive {other}")),
            }
        }
        Ok(ast)
    }
}

pub fn parse(src: &str) -> Result<Ast, ParseError> {
    Parser { toks: lex(src)?, pos: 0 }.module()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_operand_forms() {
        let ast = parse(
            ".version 9.5\n.target sm_90a\n.address_size 64\n.visible .entry k(\n.param .align 8 .b8 k_param_0[64]\n)\n{\n\
             .reg .b32 %r<4>;\n@!%p1 bra $L1;\n$L1:\nshfl.sync.bfly.b32 %r1|%p2, %r0, 16, 31, -1;\n\
             ld.global.v2.u32 {%r1, _}, [%rd1+-8];\n{ .reg .b16 t; mov.b32 %r1, 0f3F800000; }\nret;\n}\n",
        )
        .unwrap();
        let f = &ast.functions[0];
        assert_eq!(f.params[0].array, Some(64));
        let insts: Vec<&Instruction> = f.body.iter().filter_map(|s| if let Stmt::Inst(i) = s { Some(i) } else { None }).collect();
        assert_eq!(insts[0].guard, Some(("%p1".into(), true)));
        assert_eq!(insts[1].operands[0], Operand::Pair("%r1".into(), "%p2".into()));
        assert_eq!(insts[1].operands[4], Operand::Int(-1));
        assert_eq!(insts[2].operands[1], Operand::Mem(Some("%rd1".into()), -8));
        assert_eq!(insts[3].operands[1], Operand::F32(0x3F80_0000));
        assert_eq!(insts[3].line, 13);
    }

    #[test]
    fn parse_error_names_the_line() {
        let e = parse(".version 9.5\n.entry k()\n{\n add.s32 %r1, %r2 %r3;\n}\n").unwrap_err();
        assert_eq!(e.line, 4, "{e}");
    }
}
