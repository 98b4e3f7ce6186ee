//! Syntax tree -> `ir::Kernel`: resolves register names (with inline-asm scopes), labels, symbols and params, and turns
//! each opcode string into a typed `Op` once.

use std::collections::HashMap;

use crate::ir::*;
use crate::parser::{Ast, Function, Instruction, Operand, Stmt, VarDecl};
use crate::ParseError;

/// Module-level `.global` / `.const` variables, placed at fixed addresses inside this module's data window.
#[derive(Clone, Debug)]
pub struct ModuleVar {
    pub name: String,
    pub addr: u64,
    pub bytes: Vec<u8>,
}

fn err<T>(line: u32, message: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError { line, message: message.into() })
}

fn align_up(v: u64, a: u64) -> u64 {
    if a <= 1 {
        v
    } else {
        v.div_ceil(a) * a
    }
}

fn decl_bytes(d: &VarDecl) -> u64 {
    let elem = Ty::parse(d.ty.trim_start_matches('.')).map_or(1, |t| t.bytes() as u64);
    elem * d.array.unwrap_or(1)
}

fn decl_align(d: &VarDecl) -> u64 {
    if d.align > 0 {
        d.align as u64
    } else {
        Ty::parse(d.ty.trim_start_matches('.')).map_or(1, |t| t.bytes() as u64)
    }
}

/// Encodes an initializer list of a module variable into bytes.
fn init_bytes(d: &VarDecl) -> Result<Vec<u8>, ParseError> {
    let total = decl_bytes(d) as usize;
    let ty = Ty::parse(d.ty.trim_start_matches('.')).unwrap_or(Ty::B8);
    let elem = ty.bytes() as usize;
    let mut out = vec![0u8; total];
    for (i, v) in d.init.iter().enumerate() {
        let bits = match v {
            Operand::Int(x) => *x as u64,
            Operand::F32(b) => *b as u64,
            Operand::F64(b) if ty == Ty::F32 => (f64::from_bits(*b) as f32).to_bits() as u64,
            Operand::F64(b) => *b,
            _ => return err(d.line, format!("unsupported initializer for {}", d.name)),
        };
        let at = i * elem;
        if at + elem > total {
            return err(d.line, format!("too many initializers for {}", d.name));
        }
        out[at..at + elem].copy_from_slice(&bits.to_le_bytes()[..elem]);
    }
    Ok(out)
}

pub struct Decoded {
    pub kernels: Vec<Kernel>,
    pub vars: Vec<ModuleVar>,
}

pub fn decode(ast: &Ast, data_base: u64) -> Result<Decoded, ParseError> {
    let mut vars = Vec::new();
    let mut symbols: HashMap<String, (Space, u64)> = HashMap::new();
    let mut module_shared = Vec::new();
    let mut next = data_base;
    for g in &ast.globals {
        match g.space.as_str() {
            ".shared" => module_shared.push(g.clone()),
            _ if g.extern_ => {}
            _ => {
                next = align_up(next, decl_align(g).max(16));
                let bytes = init_bytes(g)?;
                symbols.insert(g.name.clone(), (Space::Global, next));
                vars.push(ModuleVar { name: g.name.clone(), addr: next, bytes: bytes.clone() });
                next += bytes.len().max(1) as u64;
            }
        }
    }
    let funcs: HashMap<&str, &Function> = ast.functions.iter().filter(|f| !f.is_entry).map(|f| (f.name.as_str(), f)).collect();
    let mut kernels = Vec::new();
    for f in ast.functions.iter().filter(|f| f.is_entry) {
        kernels.push(decode_kernel(f, &funcs, &symbols, &module_shared)?);
    }
    Ok(Decoded { kernels, vars })
}

/// Labels of one function, scoped like registers: PTX labels declared inside a `{ }` block are visible only in that
/// block and the blocks nested in it (inline asm repeats `LAB_WAIT:` / `DONE:` in every expansion of a wait loop).
#[derive(Default)]
struct Labels {
    /// Per block (0 = the function body): its enclosing block and its labels -> instruction index.
    blocks: Vec<(usize, HashMap<String, u32>)>,
}

impl Labels {
    /// Numbers the blocks in order of their `{` and places each label in its block; a label declared twice in one
    /// block is an error. Instruction indices start at `base`; a call takes two slots (call + copy of its results).
    fn collect(body: &[Stmt], base: u32, slots: impl Fn(&Instruction) -> u32) -> Result<Labels, ParseError> {
        let mut labels = Labels { blocks: vec![(0, HashMap::new())] };
        let mut open = vec![0usize];
        let mut count = base;
        for s in body {
            let current = *open.last().expect("function block");
            match s {
                Stmt::Inst(i) => count += slots(i),
                Stmt::Label(l, line) => {
                    if labels.blocks[current].1.insert(l.clone(), count).is_some() {
                        return err(*line, format!("label {l} declared twice in the same {{ }} block"));
                    }
                }
                Stmt::ScopeOpen => {
                    labels.blocks.push((current, HashMap::new()));
                    open.push(labels.blocks.len() - 1);
                }
                Stmt::ScopeClose => {
                    open.pop();
                }
                Stmt::Decl(_) => {}
            }
        }
        Ok(labels)
    }

    /// The label visible from `block`: its own, else the innermost enclosing block's.
    fn get(&self, mut block: usize, name: &str) -> Option<u32> {
        loop {
            if let Some(&at) = self.blocks[block].1.get(name) {
                return Some(at);
            }
            if block == 0 {
                return None;
            }
            block = self.blocks[block].0;
        }
    }
}

struct Ctx<'a> {
    scopes: Vec<HashMap<String, u32>>,
    num_regs: u32,
    symbols: HashMap<String, (Space, u64)>,
    labels: &'a Labels,
    /// Index in `labels.blocks` of the block being decoded, and the count of blocks opened so far.
    block: usize,
    blocks_opened: usize,
    /// Blocks currently open, innermost last.
    open_blocks: Vec<usize>,
}

impl Ctx<'_> {
    fn reg(&self, name: &str) -> Option<u32> {
        self.scopes.iter().rev().find_map(|s| s.get(name).copied())
    }
    fn label(&self, name: &str) -> Option<u32> {
        self.labels.get(self.block, name)
    }
    fn open_block(&mut self) {
        self.blocks_opened += 1;
        self.open_blocks.push(self.blocks_opened);
        self.block = self.blocks_opened;
        self.scopes.push(HashMap::new());
    }
    fn close_block(&mut self) {
        self.open_blocks.pop();
        self.block = self.open_blocks.last().copied().unwrap_or(0);
        self.scopes.pop();
    }
    fn declare(&mut self, name: String) {
        let id = self.num_regs;
        self.num_regs += 1;
        self.scopes.last_mut().expect("scope").insert(name, id);
    }

    fn dst(&self, op: &Operand, line: u32, out: &mut Vec<Option<u32>>) -> Result<(), ParseError> {
        match op {
            Operand::Sink => out.push(None),
            Operand::Name(n, 0) => out.push(Some(self.reg(n).ok_or_else(|| ParseError { line, message: format!("unknown register {n}") })?)),
            Operand::Pair(a, b) => {
                // `elect.sync _|p`: the first result may be the `_` sink.
                self.dst(&if a == "_" { Operand::Sink } else { Operand::Name(a.clone(), 0) }, line, out)?;
                self.dst(&Operand::Name(b.clone(), 0), line, out)?;
            }
            Operand::Vector(v) => {
                for e in v {
                    self.dst(e, line, out)?;
                }
            }
            other => return err(line, format!("bad destination {other:?}")),
        }
        Ok(())
    }

    /// A source operand; `fty` is the instruction's float type, so a decimal literal gets the right width.
    fn src(&self, op: &Operand, fty: Option<Ty>, line: u32, out: &mut Vec<Src>) -> Result<(), ParseError> {
        match op {
            Operand::Name(n, off) => {
                if let Some(r) = self.reg(n) {
                    out.push(Src::Reg(r));
                } else if let Some(s) = SReg::parse(n) {
                    out.push(Src::Special(s));
                } else if let Some(&(_, a)) = self.symbols.get(n) {
                    out.push(Src::Imm(a.wrapping_add(*off as u64)));
                } else if let Some(l) = self.label(n) {
                    out.push(Src::Imm(l as u64));
                } else {
                    return err(line, format!("unknown name {n}"));
                }
            }
            Operand::Not(n) => out.push(Src::NotReg(self.reg(n).ok_or_else(|| ParseError { line, message: format!("unknown predicate {n}") })?)),
            Operand::Int(v) => out.push(Src::Imm(*v as u64)),
            Operand::F32(b) => out.push(Src::Imm(if fty == Some(Ty::F64) { (f32::from_bits(*b) as f64).to_bits() } else { *b as u64 })),
            Operand::F64(b) => {
                let v = f64::from_bits(*b);
                out.push(Src::Imm(match fty {
                    Some(Ty::F64) | None => *b,
                    Some(Ty::F16 | Ty::F16x2) => crate::float::encode(v, crate::float::F16, Rnd::Rn, false) as u64,
                    Some(Ty::Bf16 | Ty::Bf16x2) => crate::float::encode(v, crate::float::BF16, Rnd::Rn, false) as u64,
                    Some(_) => (v as f32).to_bits() as u64,
                }));
            }
            Operand::Vector(v) => {
                for e in v {
                    self.src(e, fty, line, out)?;
                }
            }
            Operand::Sink => out.push(Src::Imm(0)),
            other => return err(line, format!("bad source operand {other:?}")),
        }
        Ok(())
    }

    fn addr(&self, op: &Operand, line: u32) -> Result<(Addr, Option<Space>), ParseError> {
        match op {
            Operand::Mem(None, off) => Ok((Addr { base: None, offset: *off }, None)),
            Operand::Mem(Some(n), off) => {
                if let Some(r) = self.reg(n) {
                    Ok((Addr { base: Some(r), offset: *off }, None))
                } else if let Some(&(space, a)) = self.symbols.get(n) {
                    Ok((Addr { base: None, offset: (a as i64).wrapping_add(*off) }, Some(space)))
                } else {
                    err(line, format!("unknown address base {n}"))
                }
            }
            other => err(line, format!("expected an address, found {other:?}")),
        }
    }
}

/// The callee named by a `call` instruction: its operands are `[(rets),] name [, (args)]`.
fn callee(i: &Instruction) -> Option<&str> {
    if !i.opcode.starts_with("call") {
        return None;
    }
    i.operands.iter().find_map(|o| if let Operand::Name(n, 0) = o { Some(n.as_str()) } else { None })
}

/// Functions with bodies reachable from `entry`, in discovery order (entry first), and those on a call cycle.
fn reachable<'a>(entry: &'a Function, funcs: &HashMap<&str, &'a Function>) -> (Vec<&'a Function>, Vec<String>) {
    fn visit<'a>(f: &'a Function, funcs: &HashMap<&str, &'a Function>, order: &mut Vec<&'a Function>, stack: &mut Vec<String>, cyclic: &mut Vec<String>) {
        stack.push(f.name.clone());
        for s in &f.body {
            let Stmt::Inst(i) = s else { continue };
            let Some(name) = callee(i) else { continue };
            let Some(&g) = funcs.get(name) else { continue };
            if stack.iter().any(|n| n == name) {
                cyclic.push(name.to_string());
            } else if !order.iter().any(|o| o.name == name) {
                order.push(g);
                visit(g, funcs, order, stack, cyclic);
            }
        }
        stack.pop();
    }
    let mut order = vec![entry];
    let mut cyclic = Vec::new();
    visit(entry, funcs, &mut order, &mut Vec::new(), &mut cyclic);
    (order, cyclic)
}

/// Where a device function's parameters, return values and return address live.
struct FuncLayout {
    params: Vec<(u64, u64)>,
    rets: Vec<(u64, u64)>,
    ret_reg: u32,
}

fn decode_kernel(
    f: &Function,
    funcs: &HashMap<&str, &Function>,
    module_symbols: &HashMap<String, (Space, u64)>,
    module_shared: &[VarDecl],
) -> Result<Kernel, ParseError> {
    let (units, cyclic) = reachable(f, funcs);
    let mut symbols = module_symbols.clone();
    // Kernel params in declaration order, each aligned.
    let mut params = Vec::new();
    let mut param_off = 0u64;
    for p in &f.params {
        param_off = align_up(param_off, decl_align(p));
        let bytes = decl_bytes(p);
        symbols.insert(p.name.clone(), (Space::Param, param_off));
        params.push(Param { name: p.name.clone(), offset: param_off as u32, bytes: bytes as u32 });
        param_off += bytes;
    }
    // Shared: module-level then function-level static declarations, then the dynamic (`.extern .shared`) area.
    let mut shared_off = 0u64;
    let mut dynamic_align = 16u64;
    let mut dynamic_names = Vec::new();
    let body_decls = |u: &'_ Function| u.body.iter().filter_map(|s| if let Stmt::Decl(d) = s { Some(d.clone()) } else { None }).collect::<Vec<_>>();
    let all_shared: Vec<VarDecl> = module_shared.iter().cloned().chain(units.iter().flat_map(|u| body_decls(u)).filter(|d| d.space == ".shared")).collect();
    for d in &all_shared {
        if d.extern_ || d.array == Some(0) {
            dynamic_align = dynamic_align.max(decl_align(d));
            dynamic_names.push(d.name.clone());
            continue;
        }
        shared_off = align_up(shared_off, decl_align(d));
        symbols.insert(d.name.clone(), (Space::Shared, shared_off));
        shared_off += decl_bytes(d);
    }
    let dynamic_offset = align_up(shared_off, dynamic_align);
    for n in dynamic_names {
        symbols.insert(n, (Space::Shared, dynamic_offset));
    }
    // Local memory: every unit's `.local` arrays and call-sequence `.param` variables, and each device function's
    // parameters and return values (calls copy arguments between these per-thread areas).
    let mut local_off = 0u64;
    let mut place = |d: &VarDecl| {
        local_off = align_up(local_off, decl_align(d).max(8));
        let at = local_off;
        local_off += decl_bytes(d).max(1);
        (at, decl_bytes(d))
    };
    let mut unit_symbols = Vec::new();
    let mut layouts: HashMap<String, FuncLayout> = HashMap::new();
    let mut num_regs = 0u32;
    for (ui, u) in units.iter().enumerate() {
        let mut syms = symbols.clone();
        for d in body_decls(u).iter().filter(|d| d.space == ".local" || d.space == ".param") {
            syms.insert(d.name.clone(), (Space::Local, place(d).0));
        }
        if ui > 0 {
            let mut layout = FuncLayout { params: Vec::new(), rets: Vec::new(), ret_reg: num_regs };
            num_regs += 1;
            for p in &u.params {
                let (at, bytes) = place(p);
                syms.insert(p.name.clone(), (Space::Local, at));
                layout.params.push((at, bytes));
            }
            for r in &u.rets {
                let (at, bytes) = place(r);
                syms.insert(r.name.clone(), (Space::Local, at));
                layout.rets.push((at, bytes));
            }
            layouts.insert(u.name.clone(), layout);
        }
        unit_symbols.push(syms);
    }

    let mut code: Vec<Inst> = Vec::new();
    let mut unit_start = HashMap::new();
    for (ui, u) in units.iter().enumerate() {
        unit_start.insert(u.name.clone(), code.len() as u32);
        let base = code.len() as u32;
        // Labels -> instruction indices (a call takes two slots: the call and the copy of its return values).
        let labels = Labels::collect(&u.body, base, |i| if callee(i).is_some_and(|c| layouts.contains_key(c)) { 2 } else { 1 })?;
        let mut ctx = Ctx {
            scopes: vec![HashMap::new()],
            num_regs,
            symbols: unit_symbols[ui].clone(),
            labels: &labels,
            block: 0,
            blocks_opened: 0,
            open_blocks: vec![0],
        };
        let own = if ui > 0 { layouts.get(&u.name) } else { None };
        for s in &u.body {
            match s {
                Stmt::ScopeOpen => ctx.open_block(),
                Stmt::ScopeClose => ctx.close_block(),
                Stmt::Decl(d) if d.space == ".reg" => match d.range {
                    Some(n) => (0..n).for_each(|i| ctx.declare(format!("{}{}", d.name, i))),
                    None => ctx.declare(d.name.clone()),
                },
                Stmt::Decl(d) if matches!(d.space.as_str(), ".shared" | ".local" | ".param") => {}
                Stmt::Decl(d) => return err(d.line, format!("unsupported declaration {} {}", d.space, d.name)),
                Stmt::Label(..) => {}
                Stmt::Inst(i) if i.opcode == "ret" || i.opcode == "ret.uni" => {
                    let mut inst = decode_inst(&ctx, i)?;
                    if let Some(l) = own {
                        inst.op = Op::Return(l.ret_reg);
                    }
                    code.push(inst);
                }
                Stmt::Inst(i) if callee(i).is_some() => {
                    let name = callee(i).unwrap_or_default();
                    code.extend(decode_call(&ctx, i, name, layouts.get(name), cyclic.iter().any(|c| c == name))?);
                }
                Stmt::Inst(i) => code.push(decode_inst(&ctx, i)?),
            }
        }
        num_regs = ctx.num_regs;
        // Falling off the end of a kernel exits; of a device function, returns.
        let op = own.map_or(Op::Exit, |l| Op::Return(l.ret_reg));
        code.push(Inst { op, guard: None, d: vec![], s: vec![], addr: None, line: u.line });
    }
    for inst in &mut code {
        if let Op::Call { target, callee, .. } = &mut inst.op {
            *target = unit_start[callee.as_str()];
        }
    }
    Ok(Kernel {
        name: f.name.clone(),
        code,
        num_regs,
        params,
        param_bytes: param_off as u32,
        static_shared: shared_off as u32,
        dynamic_offset: dynamic_offset as u32,
        dynamic_align: dynamic_align as u32,
        local_bytes: local_off as u32,
    })
}

/// `call (rets), name, (args)`: a direct call of a device function with a body becomes `Call` (copy the arguments,
/// jump) plus `CopyLocal` (where the callee returns to: copy its return values to the caller's); `__assertfail`
/// becomes `AssertFail`; anything else (printf's vprintf, indirect or recursive calls) cannot run.
fn decode_call(ctx: &Ctx, i: &Instruction, name: &str, layout: Option<&FuncLayout>, recursive: bool) -> Result<Vec<Inst>, ParseError> {
    let line = i.line;
    let guard = match &i.guard {
        Some((p, neg)) => Some((ctx.reg(p).ok_or_else(|| ParseError { line, message: format!("unknown predicate {p}") })?, *neg)),
        None => None,
    };
    let name_pos = i.operands.iter().position(|o| matches!(o, Operand::Name(n, 0) if n == name)).unwrap_or(0);
    let list = |o: Option<&Operand>| -> Vec<String> {
        match o {
            Some(Operand::Vector(v)) => v.iter().filter_map(|x| if let Operand::Name(n, _) = x { Some(n.clone()) } else { None }).collect(),
            _ => Vec::new(),
        }
    };
    let rets = if name_pos > 0 { list(i.operands.first()) } else { Vec::new() };
    let args = list(i.operands.get(name_pos + 1));
    let local = |n: &str| match ctx.symbols.get(n) {
        Some(&(Space::Local, at)) => Ok(at as u32),
        _ => err(line, format!("call argument {n} is not a call parameter")),
    };
    let inst = |op| Inst { op, guard, d: vec![], s: vec![], addr: None, line };
    if recursive {
        return Ok(vec![inst(Op::Unsupported(format!("recursive call to {name}"))), inst(Op::Nop)]);
    }
    match (layout, name) {
        (Some(l), _) => {
            if args.len() != l.params.len() || rets.len() > l.rets.len() {
                return err(line, format!("call to {name} with {} arguments and {} results", args.len(), rets.len()));
            }
            let copies =
                args.iter().zip(&l.params).map(|(a, &(at, bytes))| Ok((local(a)?, at as u32, bytes as u32))).collect::<Result<Vec<_>, ParseError>>()?;
            let back = rets.iter().zip(&l.rets).map(|(r, &(at, bytes))| Ok((at as u32, local(r)?, bytes as u32))).collect::<Result<Vec<_>, ParseError>>()?;
            Ok(vec![inst(Op::Call { target: 0, callee: name.to_string(), ret_reg: l.ret_reg, copies }), inst(Op::CopyLocal(back))])
        }
        (None, "__assertfail") => Ok(vec![inst(Op::AssertFail(args.iter().map(|a| local(a)).collect::<Result<Vec<_>, _>>()?))]),
        (None, "vprintf") => Ok(vec![inst(Op::Unsupported("call to vprintf (printf is not supported by the interpreter)".into()))]),
        (None, _) => Ok(vec![inst(Op::Unsupported(format!("call to {name}, which has no body in the module")))]),
    }
}

/// `mbarrier.*` in every spelling nvcc 13, libcu++ and CUTLASS emit (`.shared`, `.shared::cta`, `.shared::cluster`,
/// generic addresses; `.release/.acquire/.relaxed`, `.cta/.cluster` are accepted and have no further effect).
fn decode_mbarrier(ctx: &Ctx, i: &Instruction, inst: &mut Inst, m: &[&str]) -> Result<(), ParseError> {
    let line = i.line;
    let has = |x: &str| m.contains(&x);
    let ops = &i.operands;
    let op = match m.first().copied() {
        Some("init") => MbarOp::Init,
        Some("inval") => MbarOp::Inval,
        Some("arrive") | Some("arrive_drop") => MbarOp::Arrive { expect_tx: has("expect_tx"), no_complete: has("noComplete"), drop: m[0] == "arrive_drop" },
        Some("expect_tx") => MbarOp::ExpectTx,
        Some("complete_tx") => MbarOp::CompleteTx,
        Some("test_wait") | Some("try_wait") => MbarOp::Wait { parity: has("parity") },
        Some("pending_count") => MbarOp::PendingCount,
        _ => {
            inst.op = Op::Unsupported(i.opcode.clone());
            return Ok(());
        }
    };
    inst.op = Op::Mbar(op);
    if op == MbarOp::PendingCount {
        ctx.dst(ops.first().ok_or_else(|| ParseError { line, message: "mbarrier.pending_count needs operands".into() })?, line, &mut inst.d)?;
        return ops.get(1).map_or(err(line, "mbarrier.pending_count needs a state"), |o| ctx.src(o, None, line, &mut inst.s));
    }
    // Init, inval, expect_tx and complete_tx start with the address; arrive and the waits with a destination.
    let addr_at = match op {
        MbarOp::Init | MbarOp::Inval | MbarOp::ExpectTx | MbarOp::CompleteTx => 0,
        _ => 1,
    };
    if addr_at == 1 {
        ctx.dst(ops.first().ok_or_else(|| ParseError { line, message: format!("{} needs operands", i.opcode) })?, line, &mut inst.d)?;
    }
    let (a, sym_space) = ctx.addr(ops.get(addr_at).ok_or_else(|| ParseError { line, message: format!("{} needs an address", i.opcode) })?, line)?;
    let space = symbol_space(sym_space, space_of(m));
    if !matches!(space, Space::Shared | Space::Generic) {
        return err(line, format!("{}: an mbarrier lives in shared memory", i.opcode));
    }
    inst.addr = Some(a);
    for o in &ops[addr_at + 1..] {
        ctx.src(o, None, line, &mut inst.s)?;
    }
    // `s[0]` says how to read the address: 1 = a shared-window offset, 0 = generic (resolved at run time).
    inst.s.insert(0, Src::Imm((space == Space::Shared) as u64));
    let want = match op {
        MbarOp::Init | MbarOp::ExpectTx | MbarOp::CompleteTx => 1..=1,
        MbarOp::Inval => 0..=0,
        MbarOp::Arrive { expect_tx: true, .. } => 1..=2,
        MbarOp::Arrive { no_complete: true, .. } => 1..=1,
        MbarOp::Arrive { .. } => 0..=1,
        MbarOp::Wait { .. } => 1..=2,
        MbarOp::PendingCount => 1..=1,
    };
    if !want.contains(&(inst.s.len() - 1)) {
        return err(line, format!("{}: wrong number of operands", i.opcode));
    }
    Ok(())
}

/// An address operand as two sources (base register or 0, offset), for instructions with several addresses. A
/// symbol becomes its generic address (param and shared symbols are offsets into their windows).
fn addr_sources(ctx: &Ctx, op: &Operand, line: u32, out: &mut Vec<Src>) -> Result<(), ParseError> {
    let (base, offset) = match op {
        Operand::Mem(b, off) => (b.clone(), *off),
        Operand::Tensor(b, _) => (Some(b.clone()), 0),
        other => return err(line, format!("expected an address, found {other:?}")),
    };
    match base {
        Some(n) => match ctx.reg(&n) {
            Some(r) => out.extend([Src::Reg(r), Src::Imm(offset as u64)]),
            None => {
                let &(space, a) = ctx.symbols.get(&n).ok_or_else(|| ParseError { line, message: format!("unknown address base {n}") })?;
                let window = match space {
                    Space::Param => crate::memory::PARAM_WINDOW,
                    Space::Shared => crate::memory::SHARED_WINDOW,
                    _ => 0,
                };
                out.extend([Src::Imm(0), Src::Imm(window.wrapping_add(a).wrapping_add(offset as u64))]);
            }
        },
        None => out.extend([Src::Imm(0), Src::Imm(offset as u64)]),
    }
    Ok(())
}

/// `cp.async.bulk{.tensor}` copies, their groups and prefetches (PTX ISA §9.7.9.25). Supported: tile-mode tensor
/// loads (with the mbarrier completion, multicast to a cluster of one CTA) and stores (bulk_group), and the
/// non-tensor global<->shared copies; im2col modes, reductions and shared::cluster<-shared::cta copies are not.
fn decode_bulk(ctx: &Ctx, i: &Instruction, inst: &mut Inst, m: &[&str]) -> Result<(), ParseError> {
    let line = i.line;
    let has = |x: &str| m.contains(&x);
    let ops = &i.operands;
    if has("commit_group") {
        inst.op = Op::BulkCommit;
        return Ok(());
    }
    if has("wait_group") {
        let n = match ops.first() {
            Some(Operand::Int(n)) => *n as u32,
            _ => return err(line, "cp.async.bulk.wait_group needs an immediate"),
        };
        inst.op = Op::BulkWait { n, read: has("read") };
        return Ok(());
    }
    if has("prefetch") {
        if has("tensor") {
            // A tensor prefetch's box is not counted (no kernel issues one); it has no architectural effect.
            inst.op = Op::Nop;
        } else {
            inst.addr = Some(ctx.addr(ops.first().ok_or_else(|| ParseError { line, message: format!("{}: missing address", i.opcode) })?, line)?.0);
            ctx.src(ops.get(1).ok_or_else(|| ParseError { line, message: format!("{}: missing size", i.opcode) })?, None, line, &mut inst.s)?;
            inst.op = Op::PrefetchL2 { space: Space::Global, bulk: true };
        }
        return Ok(());
    }
    // The destination space comes first: `.shared::*.global` loads, `.global.shared::cta` stores.
    let first_space = m.iter().find(|x| x.starts_with("shared") || **x == "global").copied();
    let load = first_space.is_some_and(|x| x.starts_with("shared"));
    let spaces = m.iter().filter(|x| x.starts_with("shared") || **x == "global").count();
    if spaces != 2
        || m.iter().any(|x| x.starts_with("im2col") || x.starts_with("gather") || x.starts_with("scatter"))
        || (load && m.iter().filter(|x| x.starts_with("shared")).count() > 1)
    {
        inst.op = Op::Unsupported(i.opcode.clone());
        return Ok(());
    }
    let operand = |k: usize| ops.get(k).ok_or_else(|| ParseError { line, message: format!("{}: missing operand {}", i.opcode, k + 1) });
    if has("tensor") {
        let dims = m.iter().find_map(|x| x.strip_suffix('d').and_then(|d| d.parse::<u32>().ok())).filter(|d| (1..=5).contains(d));
        let Some(dims) = dims else { return err(line, format!("{}: needs a dimension .1d .. .5d", i.opcode)) };
        let (map_at, other_at) = if load { (1, 0) } else { (0, 1) };
        let Operand::Tensor(_, coords) = operand(map_at)? else { return err(line, format!("{}: expected [tensorMap, {{coordinates}}]", i.opcode)) };
        if coords.len() != dims as usize {
            return err(line, format!("{}: {} coordinates for a {dims}d copy", i.opcode, coords.len()));
        }
        inst.addr = Some(ctx.addr(operand(other_at)?, line)?.0);
        addr_sources(ctx, operand(map_at)?, line, &mut inst.s)?;
        for c in coords {
            ctx.src(c, None, line, &mut inst.s)?;
        }
        if load {
            if !has("mbarrier::complete_tx::bytes") {
                return err(line, format!("{}: a tensor load completes on an mbarrier", i.opcode));
            }
            addr_sources(ctx, operand(2)?, line, &mut inst.s)?;
            if has("multicast::cluster") {
                ctx.src(operand(3)?, None, line, &mut inst.s)?; // ctaMask
            }
            inst.op = Op::TmaLoad { dims };
        } else {
            if !has("bulk_group") {
                return err(line, format!("{}: a tensor store completes through bulk_group", i.opcode));
            }
            inst.op = Op::TmaStore { dims };
        }
    } else if load {
        if !has("mbarrier::complete_tx::bytes") {
            return err(line, format!("{}: a bulk load completes on an mbarrier", i.opcode));
        }
        inst.addr = Some(ctx.addr(operand(0)?, line)?.0);
        addr_sources(ctx, operand(1)?, line, &mut inst.s)?;
        ctx.src(operand(2)?, None, line, &mut inst.s)?;
        addr_sources(ctx, operand(3)?, line, &mut inst.s)?;
        if has("multicast::cluster") {
            ctx.src(operand(4)?, None, line, &mut inst.s)?;
        }
        inst.op = Op::BulkLoad;
    } else {
        if !has("bulk_group") {
            inst.op = Op::Unsupported(i.opcode.clone());
            return Ok(());
        }
        inst.addr = Some(ctx.addr(operand(1)?, line)?.0);
        addr_sources(ctx, operand(0)?, line, &mut inst.s)?;
        ctx.src(operand(2)?, None, line, &mut inst.s)?;
        inst.op = Op::BulkStore;
    }
    Ok(())
}

/// `wgmma.*` (PTX ISA §9.7.15). Supported: m64nNk16 with f16/bf16 inputs and f32 (or f16 for f16 inputs)
/// accumulators; m64nNk32 with e4m3/e5m2 inputs (any mix of A and B types) and f32 or f16 accumulators; m64nNk8 with
/// tf32 inputs and f32 accumulators; A from a descriptor or registers. int8 and `.sp` decode as unsupported.
fn decode_wgmma(ctx: &Ctx, i: &Instruction, inst: &mut Inst, m: &[&str]) -> Result<(), ParseError> {
    let line = i.line;
    let ops = &i.operands;
    match m.first().copied() {
        Some("fence") => inst.op = Op::WgmmaFence,
        Some("commit_group") => inst.op = Op::WgmmaCommit,
        Some("wait_group") => match ops.first() {
            Some(Operand::Int(n)) => inst.op = Op::WgmmaWait(*n as u32),
            _ => return err(line, "wgmma.wait_group needs an immediate"),
        },
        Some("mma_async") => {
            let shape = m.iter().find_map(|x| {
                let (n, k) = x.strip_prefix("m64n")?.split_once('k')?;
                Some((n.parse::<u32>().ok()?, k.parse::<u32>().ok()?))
            });
            let tys: Vec<Ty> = m.iter().filter_map(|x| Ty::parse(x)).collect();
            let Some((n, k)) = shape else { return err(line, format!("{}: no m64nNkK shape", i.opcode)) };
            let fp8 = |t: Ty| matches!(t, Ty::E4m3 | Ty::E5m2);
            if tys.len() == 3 && fp8(tys[1]) && fp8(tys[2]) && !m.contains(&"sp") {
                if k != 32 || !matches!(tys[0], Ty::F32 | Ty::F16) {
                    return err(line, format!("{}: e4m3/e5m2 inputs need the k32 shape and an f32 or f16 accumulator", i.opcode));
                }
            } else if tys.len() == 3 && tys[1] == Ty::Tf32 && tys[2] == Ty::Tf32 && !m.contains(&"sp") {
                if k != 8 || tys[0] != Ty::F32 {
                    return err(line, format!("{}: tf32 inputs need the k8 shape and an f32 accumulator", i.opcode));
                }
            } else {
                let supported = !m.contains(&"sp")
                    && k == 16
                    && tys.len() == 3
                    && tys[1] == tys[2]
                    && matches!(tys[1], Ty::F16 | Ty::Bf16)
                    && (tys[0] == Ty::F32 || (tys[0] == Ty::F16 && tys[1] == Ty::F16));
                if !supported {
                    inst.op = Op::Unsupported(i.opcode.clone());
                    return Ok(());
                }
            }
            if n % 8 != 0 || !(8..=256).contains(&n) {
                return err(line, format!("{}: N must be a multiple of 8 in 8..=256", i.opcode));
            }
            let a_in_regs = matches!(ops.get(1), Some(Operand::Vector(_)));
            // Only the 16-bit types have the imm-trans operands (PTX ISA §9.7.15.5.2); RS has no imm-trans-a.
            let transposable = k == 16;
            let (want_ops, names) = match (a_in_regs, transposable) {
                (false, true) => (8, "d, a-desc, b-desc, scale-d, imm-scale-a, imm-scale-b, imm-trans-a, imm-trans-b"),
                (true, true) => (7, "d, a, b-desc, scale-d, imm-scale-a, imm-scale-b, imm-trans-b"),
                (false, false) => (6, "d, a-desc, b-desc, scale-d, imm-scale-a, imm-scale-b"),
                (true, false) => (6, "d, a, b-desc, scale-d, imm-scale-a, imm-scale-b"),
            };
            if ops.len() != want_ops {
                return err(line, format!("{}: expected {want_ops} operands ({names}), found {}", i.opcode, ops.len()));
            }
            let d_regs = if tys[0] == Ty::F32 { n / 2 } else { n / 4 };
            ctx.dst(&ops[0], line, &mut inst.d)?;
            if inst.d.len() != d_regs as usize || inst.d.contains(&None) {
                return err(line, format!("{}: the accumulator takes {d_regs} registers", i.opcode));
            }
            for o in &ops[1..4] {
                ctx.src(o, None, line, &mut inst.s)?;
            }
            if a_in_regs && inst.s.len() != 6 {
                return err(line, format!("{}: A in registers takes 4 registers", i.opcode));
            }
            let imm = |k: usize, allowed: &[i64]| match ops.get(k) {
                Some(Operand::Int(v)) if allowed.contains(v) => Ok(*v),
                other => err(line, format!("{}: operand {} must be one of {allowed:?}, found {other:?}", i.opcode, k + 1)),
            };
            let neg_a = imm(4, &[1, -1])? == -1;
            let neg_b = imm(5, &[1, -1])? == -1;
            let (trans_a, trans_b) = match (a_in_regs, transposable) {
                (_, false) => (false, false),
                (true, true) => (false, imm(6, &[0, 1])? == 1),
                (false, true) => (imm(6, &[0, 1])? == 1, imm(7, &[0, 1])? == 1),
            };
            inst.op = Op::Wgmma(WgmmaSpec { n, k, d_ty: tys[0], a_ty: tys[1], b_ty: tys[2], a_in_regs, neg_a, neg_b, trans_a, trans_b });
        }
        _ => inst.op = Op::Unsupported(i.opcode.clone()),
    }
    Ok(())
}

fn rounding(m: &[&str]) -> Rnd {
    for x in m {
        match *x {
            "rn" => return Rnd::Rn,
            "rz" => return Rnd::Rz,
            "rm" => return Rnd::Rm,
            "rp" => return Rnd::Rp,
            "rna" => return Rnd::Rna,
            "rni" => return Rnd::Rni,
            "rzi" => return Rnd::Rzi,
            "rmi" => return Rnd::Rmi,
            "rpi" => return Rnd::Rpi,
            _ => {}
        }
    }
    Rnd::None
}

/// The space of an access through a symbol: call parameters live in local memory whatever the instruction says.
fn symbol_space(symbol: Option<Space>, written: Space) -> Space {
    match symbol {
        Some(Space::Local) => Space::Local,
        Some(s) if written == Space::Generic => s,
        _ => written,
    }
}

fn space_of(m: &[&str]) -> Space {
    for x in m {
        match *x {
            "global" => return Space::Global,
            // `.shared::cluster` addresses of a cluster of one CTA are this CTA's shared offsets (mapa is the identity).
            "shared" | "shared::cta" | "shared::cluster" => return Space::Shared,
            "local" => return Space::Local,
            "param" | "param::entry" | "param::func" => return Space::Param,
            "const" => return Space::Const,
            _ => {}
        }
    }
    Space::Generic
}

fn vec_of(m: &[&str]) -> u32 {
    for x in m {
        match *x {
            "v2" => return 2,
            "v4" => return 4,
            "v8" => return 8,
            _ => {}
        }
    }
    1
}

fn cmp_of(s: &str) -> Option<Cmp> {
    Some(match s {
        "eq" => Cmp::Eq,
        "ne" => Cmp::Ne,
        "lt" => Cmp::Lt,
        "le" => Cmp::Le,
        "gt" => Cmp::Gt,
        "ge" => Cmp::Ge,
        "lo" => Cmp::Lo,
        "ls" => Cmp::Ls,
        "hi" => Cmp::Hi,
        "hs" => Cmp::Hs,
        "equ" => Cmp::Equ,
        "neu" => Cmp::Neu,
        "ltu" => Cmp::Ltu,
        "leu" => Cmp::Leu,
        "gtu" => Cmp::Gtu,
        "geu" => Cmp::Geu,
        "num" => Cmp::Num,
        "nan" => Cmp::Nan,
        _ => return None,
    })
}

fn bool_of(m: &[&str]) -> Option<BoolOp> {
    m.iter().find_map(|x| match *x {
        "and" => Some(BoolOp::And),
        "or" => Some(BoolOp::Or),
        "xor" => Some(BoolOp::Xor),
        _ => None,
    })
}

fn atom_op(m: &[&str]) -> Option<AtomOp> {
    m.iter().find_map(|x| {
        Some(match *x {
            "add" => AtomOp::Add,
            "min" => AtomOp::Min,
            "max" => AtomOp::Max,
            "inc" => AtomOp::Inc,
            "dec" => AtomOp::Dec,
            "and" => AtomOp::And,
            "or" => AtomOp::Or,
            "xor" => AtomOp::Xor,
            "exch" => AtomOp::Exch,
            "cas" => AtomOp::Cas,
            _ => return None,
        })
    })
}

fn decode_inst(ctx: &Ctx, i: &Instruction) -> Result<Inst, ParseError> {
    let line = i.line;
    let parts: Vec<&str> = i.opcode.split('.').collect();
    let base = parts[0];
    let m = &parts[1..];
    let has = |x: &str| m.contains(&x);
    let tys: Vec<Ty> = m.iter().filter_map(|x| Ty::parse(x)).collect();
    let ty = tys.last().copied().unwrap_or(Ty::B32);
    let guard = match &i.guard {
        Some((p, neg)) => Some((ctx.reg(p).ok_or_else(|| ParseError { line, message: format!("unknown predicate {p}") })?, *neg)),
        None => None,
    };
    let mut inst = Inst { op: Op::Nop, guard, d: vec![], s: vec![], addr: None, line };
    let ops = &i.operands;
    let fty = if ty.is_float() { Some(ty) } else { None };
    // The common shape: first operand is the destination, the rest are sources.
    let dst_src = |inst: &mut Inst, fty: Option<Ty>| -> Result<(), ParseError> {
        if let Some(first) = ops.first() {
            ctx.dst(first, line, &mut inst.d)?;
        }
        for o in ops.iter().skip(1) {
            ctx.src(o, fty, line, &mut inst.s)?;
        }
        Ok(())
    };
    let unsupported = |inst: &mut Inst| inst.op = Op::Unsupported(i.opcode.clone());

    match base {
        "mov" => {
            match (ops.first(), ops.get(1)) {
                (Some(Operand::Vector(v)), _) => inst.op = Op::Unpack { parts: v.len() as u32, bits: ty.bits() / v.len() as u32 },
                (_, Some(Operand::Vector(v))) => inst.op = Op::Pack { parts: v.len() as u32, bits: ty.bits() / v.len() as u32 },
                _ => inst.op = Op::Mov(ty),
            }
            dst_src(&mut inst, fty)?;
        }
        "add" | "sub" | "mul" | "mad" | "fma" | "div" | "rem" | "min" | "max" | "abs" | "neg" | "mul24" | "mad24" | "sad" if !ty.is_float() => {
            let op = match (base, has("hi"), has("wide")) {
                ("add", ..) => IntOp::Add,
                ("sub", ..) => IntOp::Sub,
                ("mul", true, _) => IntOp::MulHi,
                ("mul", _, true) => IntOp::MulWide,
                ("mul", ..) => IntOp::MulLo,
                ("mul24", false, _) => IntOp::Mul24Lo,
                ("mad", true, _) => IntOp::MadHi,
                ("mad", _, true) => IntOp::MadWide,
                ("mad", ..) => IntOp::MadLo,
                ("div", ..) => IntOp::Div,
                ("rem", ..) => IntOp::Rem,
                ("min", ..) => IntOp::Min,
                ("max", ..) => IntOp::Max,
                ("abs", ..) => IntOp::Abs,
                ("neg", ..) => IntOp::Neg,
                ("sad", ..) => IntOp::Sad,
                _ => {
                    unsupported(&mut inst);
                    return Ok(inst);
                }
            };
            if has("cc") || base == "mad24" || m.iter().any(|x| x.starts_with("relu")) {
                unsupported(&mut inst);
                return Ok(inst);
            }
            inst.op = Op::Int { op, ty, sat: has("sat") };
            dst_src(&mut inst, None)?;
        }
        "add" | "sub" | "mul" | "fma" | "mad" | "div" | "rcp" | "sqrt" | "rsqrt" | "ex2" | "lg2" | "sin" | "cos" | "tanh" | "min" | "max" | "abs" | "neg"
        | "copysign" => {
            let op = match base {
                "add" => FloatOp::Add,
                "sub" => FloatOp::Sub,
                "mul" => FloatOp::Mul,
                "fma" | "mad" => FloatOp::Fma,
                "div" => FloatOp::Div,
                "rcp" => FloatOp::Rcp,
                "sqrt" => FloatOp::Sqrt,
                "rsqrt" => FloatOp::Rsqrt,
                "ex2" => FloatOp::Ex2,
                "lg2" => FloatOp::Lg2,
                "sin" => FloatOp::Sin,
                "cos" => FloatOp::Cos,
                "tanh" => FloatOp::Tanh,
                "min" => FloatOp::Min,
                "max" => FloatOp::Max,
                "abs" => FloatOp::Abs,
                "neg" => FloatOp::Neg,
                _ => FloatOp::Copysign,
            };
            if has("NaN") || has("xorsign") || has("relu") || has("oob") {
                unsupported(&mut inst);
                return Ok(inst);
            }
            inst.op = Op::Float { op, ty, rnd: rounding(m), ftz: has("ftz"), sat: has("sat"), approx: has("approx") };
            dst_src(&mut inst, fty)?;
        }
        "and" | "or" | "xor" | "not" | "cnot" | "shl" | "shr" | "popc" | "clz" | "brev" | "bfind" | "bfe" | "bfi" => {
            let op = match base {
                "and" => IntOp::And,
                "or" => IntOp::Or,
                "xor" => IntOp::Xor,
                "not" => IntOp::Not,
                "cnot" => IntOp::CNot,
                "shl" => IntOp::Shl,
                "shr" => IntOp::Shr,
                "popc" => IntOp::Popc,
                "clz" => IntOp::Clz,
                "brev" => IntOp::Brev,
                "bfind" => IntOp::Bfind,
                "bfe" => IntOp::Bfe,
                _ => IntOp::Bfi,
            };
            if has("shiftamt") {
                unsupported(&mut inst);
                return Ok(inst);
            }
            inst.op = Op::Int { op, ty, sat: false };
            dst_src(&mut inst, None)?;
        }
        "lop3" => {
            inst.op = Op::Int { op: IntOp::Lop3, ty, sat: false };
            dst_src(&mut inst, None)?;
        }
        "shf" => {
            let wrap = has("wrap");
            inst.op = Op::Int { op: if has("l") { IntOp::ShfL { wrap } } else { IntOp::ShfR { wrap } }, ty: Ty::B32, sat: false };
            dst_src(&mut inst, None)?;
        }
        "elect" => {
            inst.op = Op::Elect;
            dst_src(&mut inst, None)?;
        }
        "testp" => {
            let test = match m.first().copied() {
                Some("finite") => TestpKind::Finite,
                Some("infinite") => TestpKind::Infinite,
                Some("number") => TestpKind::Number,
                Some("notanumber") => TestpKind::NotANumber,
                Some("normal") => TestpKind::Normal,
                Some("subnormal") => TestpKind::Subnormal,
                _ => return err(line, format!("bad {}", i.opcode)),
            };
            inst.op = Op::Testp { test, ty };
            dst_src(&mut inst, None)?;
        }
        "dp4a" => {
            if tys.len() != 2 {
                unsupported(&mut inst);
                return Ok(inst);
            }
            inst.op = Op::Int { op: IntOp::Dp4a { a_signed: tys[0] == Ty::S32, b_signed: tys[1] == Ty::S32 }, ty: Ty::B32, sat: false };
            dst_src(&mut inst, None)?;
        }
        "prmt" => {
            let mode = match m.get(1).copied() {
                Some("f4e") => PrmtMode::F4e,
                Some("b4e") => PrmtMode::B4e,
                Some("rc8") => PrmtMode::Rc8,
                Some("ecl") => PrmtMode::Ecl,
                Some("ecr") => PrmtMode::Ecr,
                Some("rc16") => PrmtMode::Rc16,
                _ => PrmtMode::Default,
            };
            inst.op = Op::Prmt(mode);
            dst_src(&mut inst, None)?;
        }
        "setp" | "set" => {
            let cmp = m.first().and_then(|c| cmp_of(c)).ok_or_else(|| ParseError { line, message: format!("bad comparison in {}", i.opcode) })?;
            let combine = bool_of(&m[1..]);
            let sty = ty;
            let fty = if sty.is_float() { Some(sty) } else { None };
            if base == "setp" {
                inst.op = Op::Setp { cmp, ty: sty, combine, ftz: has("ftz") };
            } else {
                if tys.len() != 2 {
                    unsupported(&mut inst);
                    return Ok(inst);
                }
                inst.op = Op::Set { cmp, dty: tys[0], ty: tys[1], combine };
            }
            dst_src(&mut inst, fty)?;
        }
        "selp" => {
            inst.op = Op::Selp(ty);
            dst_src(&mut inst, fty)?;
        }
        "slct" => {
            if tys.len() != 2 {
                return err(line, format!("bad {}", i.opcode));
            }
            inst.op = Op::Slct { ty: tys[0], cty: tys[1] };
            dst_src(&mut inst, if tys[0].is_float() { Some(tys[0]) } else { None })?;
        }
        "cvt" => {
            if tys.len() != 2 {
                return err(line, format!("cvt needs two types: {}", i.opcode));
            }
            inst.op = Op::Cvt { dty: tys[0], sty: tys[1], rnd: rounding(m), ftz: has("ftz"), sat: has("sat"), satfinite: has("satfinite"), relu: has("relu") };
            dst_src(&mut inst, if tys[1].is_float() { Some(tys[1]) } else { None })?;
        }
        "cvta" => {
            inst.op = Op::Cvta { space: space_of(m), to_space: has("to"), bits: ty.bits() };
            dst_src(&mut inst, None)?;
        }
        "isspacep" => {
            inst.op = Op::IsSpace(space_of(m));
            dst_src(&mut inst, None)?;
        }
        "ld" | "ldu" => {
            let (a, sym_space) = ctx.addr(ops.get(1).ok_or_else(|| ParseError { line, message: "ld without address".into() })?, line)?;
            inst.op = Op::Ld { space: symbol_space(sym_space, space_of(m)), ty, vec: vec_of(m), nc: has("nc") || base == "ldu" };
            ctx.dst(&ops[0], line, &mut inst.d)?;
            inst.addr = Some(a);
            // An optional cache-policy operand (`.L2::cache_hint`) is not needed to run.
        }
        "st" => {
            let (a, sym_space) = ctx.addr(ops.first().ok_or_else(|| ParseError { line, message: "st without address".into() })?, line)?;
            inst.op = Op::St { space: symbol_space(sym_space, space_of(m)), ty, vec: vec_of(m) };
            ctx.src(ops.get(1).ok_or_else(|| ParseError { line, message: "st without value".into() })?, fty, line, &mut inst.s)?;
            inst.addr = Some(a);
        }
        "atom" | "red" => {
            let op = atom_op(m).ok_or_else(|| ParseError { line, message: format!("bad atomic {}", i.opcode) })?;
            let returns = base == "atom";
            let addr_pos = if returns { 1 } else { 0 };
            let (a, sym_space) = ctx.addr(ops.get(addr_pos).ok_or_else(|| ParseError { line, message: "atom without address".into() })?, line)?;
            let space = sym_space.filter(|_| space_of(m) == Space::Generic).unwrap_or(space_of(m));
            inst.op = Op::Atom { space, op, ty, returns, vec: vec_of(m) };
            if returns {
                ctx.dst(&ops[0], line, &mut inst.d)?;
            }
            for o in ops.iter().skip(addr_pos + 1) {
                ctx.src(o, fty, line, &mut inst.s)?;
            }
            inst.addr = Some(a);
        }
        "cp" if m.first() == Some(&"async") && has("bulk") => decode_bulk(ctx, i, &mut inst, m)?,
        "cp" if m.first() == Some(&"async") && !has("bulk") && !has("mbarrier") => {
            if has("commit_group") {
                inst.op = Op::CpAsyncCommit;
            } else if has("wait_group") {
                let n = match ops.first() {
                    Some(Operand::Int(n)) => *n as u32,
                    _ => return err(line, "cp.async.wait_group needs an immediate"),
                };
                inst.op = Op::CpAsyncWait(n);
            } else if has("wait_all") {
                inst.op = Op::CpAsyncWait(u32::MAX);
            } else {
                let (dst, _) = ctx.addr(&ops[0], line)?;
                let (src, _) = ctx.addr(ops.get(1).ok_or_else(|| ParseError { line, message: "cp.async without source".into() })?, line)?;
                let bytes = match ops.get(2) {
                    Some(Operand::Int(n)) => *n as u32,
                    _ => return err(line, "cp.async needs an immediate copy size"),
                };
                inst.addr = Some(dst);
                inst.s.push(src.base.map_or(Src::Imm(0), Src::Reg));
                inst.s.push(Src::Imm(src.offset as u64));
                // src-size (zero-fills the rest); a cache-policy operand is a 64-bit register when `.L2::cache_hint`.
                let zfill = ops.len() > 3 && !(ops.len() == 4 && has("L2::cache_hint"));
                if zfill {
                    ctx.src(&ops[3], None, line, &mut inst.s)?;
                }
                inst.op = Op::CpAsync { bytes, zfill };
            }
        }
        "bra" => {
            let target = match ops.first() {
                Some(Operand::Name(l, 0)) => ctx
                    .label(l)
                    .ok_or_else(|| ParseError { line, message: format!("unknown label {l} (not declared in this {{ }} block or an enclosing one)") })?,
                _ => return err(line, "bra needs a label"),
            };
            inst.op = Op::Bra(target);
        }
        "ret" | "exit" => inst.op = Op::Exit,
        "trap" | "brkpt" => inst.op = Op::Trap,
        "barrier" if has("cluster") => {
            inst.op = if has("arrive") { Op::ClusterArrive } else { Op::ClusterWait };
        }
        "mbarrier" => decode_mbarrier(ctx, i, &mut inst, m)?,
        "setmaxnreg" => match ops.first() {
            Some(Operand::Int(n)) if has("inc") || has("dec") => inst.op = Op::SetMaxNReg(*n as u32),
            _ => return err(line, format!("{} needs .inc/.dec and an immediate register count", i.opcode)),
        },
        "mapa" => {
            inst.op = Op::Mapa;
            dst_src(&mut inst, None)?;
        }
        "getctarank" => {
            inst.op = Op::GetCtaRank;
            dst_src(&mut inst, None)?;
        }
        "bar" | "barrier" if has("warp") => {
            inst.op = Op::BarWarp;
            for o in ops {
                ctx.src(o, None, line, &mut inst.s)?;
            }
        }
        "bar" | "barrier" => {
            let kind = if has("arrive") {
                BarKind::Arrive
            } else if has("red") {
                if has("popc") {
                    BarKind::RedPopc
                } else if has("and") {
                    BarKind::RedAnd
                } else {
                    BarKind::RedOr
                }
            } else {
                BarKind::Sync
            };
            if matches!(kind, BarKind::RedPopc | BarKind::RedAnd | BarKind::RedOr) {
                dst_src(&mut inst, None)?;
                inst.op = Op::Bar { kind, id_is_operand: true, has_count: ops.len() == 4 };
            } else {
                for o in ops {
                    ctx.src(o, None, line, &mut inst.s)?;
                }
                inst.op = Op::Bar { kind, id_is_operand: !ops.is_empty(), has_count: ops.len() > 1 };
            }
        }
        // Memory fences, `fence.proxy.tensormap::generic.{release,acquire}` and `fence.mbarrier_init.release.cluster`
        // order nothing an interpreter has to delay: accesses happen in program order and async copies land when waited
        // for. (`fence.proxy.async` is recorded for the proxy check above.)
        "fence" if has("proxy") && m.iter().any(|x| x.starts_with("async")) => inst.op = Op::ProxyFence,
        "membar" | "fence" => inst.op = Op::Fence,
        "shfl" => {
            let mode = match m.get(1).copied() {
                Some("up") => ShflMode::Up,
                Some("down") => ShflMode::Down,
                Some("bfly") => ShflMode::Bfly,
                Some("idx") => ShflMode::Idx,
                _ => return err(line, format!("bad shfl {}", i.opcode)),
            };
            if !has("sync") {
                unsupported(&mut inst);
                return Ok(inst);
            }
            inst.op = Op::Shfl(mode);
            dst_src(&mut inst, None)?;
        }
        "vote" => {
            let mode = if has("all") {
                VoteMode::All
            } else if has("any") {
                VoteMode::Any
            } else if has("uni") {
                VoteMode::Uni
            } else {
                VoteMode::Ballot
            };
            inst.op = Op::Vote(mode);
            dst_src(&mut inst, None)?;
            if inst.s.len() == 1 {
                inst.s.push(Src::Imm(u32::MAX as u64)); // non-.sync form: the whole warp
            }
        }
        "activemask" => {
            inst.op = Op::Activemask;
            dst_src(&mut inst, None)?;
        }
        "redux" => {
            let op = atom_op(m).ok_or_else(|| ParseError { line, message: format!("bad redux {}", i.opcode) })?;
            inst.op = Op::Redux { op, ty };
            dst_src(&mut inst, fty)?;
        }
        "match" => {
            inst.op = Op::Match { all: has("all"), ty };
            dst_src(&mut inst, None)?;
        }
        "ldmatrix" | "stmatrix" => {
            let num = if has("x4") {
                4
            } else if has("x2") {
                2
            } else {
                1
            };
            if !has("m8n8") || !has("b16") {
                unsupported(&mut inst);
                return Ok(inst);
            }
            if base == "ldmatrix" {
                inst.op = Op::Ldmatrix { num, trans: has("trans") };
                ctx.dst(&ops[0], line, &mut inst.d)?;
                inst.addr = Some(ctx.addr(&ops[1], line)?.0);
            } else {
                inst.op = Op::Stmatrix { num, trans: has("trans") };
                inst.addr = Some(ctx.addr(&ops[0], line)?.0);
                ctx.src(&ops[1], None, line, &mut inst.s)?;
            }
        }
        "wgmma" => decode_wgmma(ctx, i, &mut inst, m)?,
        "mma" => {
            let shape = m.iter().find_map(|x| {
                let rest = x.strip_prefix('m')?;
                let (mm, rest) = rest.split_once('n')?;
                let (nn, kk) = rest.split_once('k')?;
                Some(MmaShape { m: mm.parse().ok()?, n: nn.parse().ok()?, k: kk.parse().ok()? })
            });
            let supported = has("sync") && tys.len() == 4 && !has("sp") && !m.iter().any(|x| x.starts_with("kind") || x.starts_with("block_scale"));
            match shape {
                Some(shape) if supported && shape.m == 16 && shape.n == 8 && has("row") && has("col") => {
                    inst.op = Op::Mma { shape, d: tys[0], a: tys[1], b: tys[2], c: tys[3] };
                    dst_src(&mut inst, None)?;
                }
                _ => unsupported(&mut inst),
            }
        }
        "griddepcontrol" if has("wait") => inst.op = Op::GridDepWait,
        "griddepcontrol" if has("launch_dependents") => inst.op = Op::GridDepLaunchDependents,
        // `prefetch{.global}.L2` pulls a line into L2: the timing model counts it. Prefetches to L1, of local memory
        // or of a tensor map only warm caches the model does not follow: no effect an interpreter can observe.
        "prefetch" if m.iter().any(|x| x.starts_with("L2")) && matches!(space_of(m), Space::Global | Space::Generic) => {
            let (a, sym_space) = ctx.addr(ops.first().ok_or_else(|| ParseError { line, message: "prefetch without address".into() })?, line)?;
            inst.op = Op::PrefetchL2 { space: symbol_space(sym_space, space_of(m)), bulk: false };
            inst.addr = Some(a);
        }
        "prefetch" | "prefetchu" | "applypriority" | "discard" | "nanosleep" | "pmevent" => inst.op = Op::Nop,
        "createpolicy" => {
            inst.op = Op::CreatePolicy;
            ctx.dst(&ops[0], line, &mut inst.d)?;
        }
        _ => unsupported(&mut inst),
    }
    Ok(inst)
}
