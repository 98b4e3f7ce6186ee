//! The interpreter from the command line.
//!
//! `ptxsim info FILE.ptx`: the kernels of a PTX module as the interpreter sees them (parameters, shared and local
//! memory, registers, instructions) and every instruction it cannot run, with its line. Exits non-zero if any.
//!
//! `ptxsim run FILE.ptx KERNEL --grid X,Y,Z --block X,Y,Z [--shared BYTES] ARGS...`: runs a kernel and prints its
//! counters. ARGS build the parameter bytes in order: `buf:BYTES` (a device buffer filled with a repeating
//! non-trivial byte pattern; its address is the argument), `u32:V`, `i32:V`, `f32:V`, `u64:V`, `pad:N`.

use std::process::ExitCode;

const USAGE: &str =
    "usage: ptxsim info FILE.ptx | ptxsim run FILE.ptx KERNEL --grid X,Y,Z --block X,Y,Z [--shared BYTES] [buf:BYTES|u32:V|i32:V|f32:V|u64:V|pad:N]...";

fn dims(s: &str) -> Result<[u32; 3], String> {
    let v: Vec<u32> = s.split(',').map(|x| x.parse::<u32>().map_err(|e| format!("{s}: {e}"))).collect::<Result<_, _>>()?;
    Ok([v.first().copied().unwrap_or(1), v.get(1).copied().unwrap_or(1), v.get(2).copied().unwrap_or(1)])
}

fn run(module: &ptxsim::Module, args: &[String]) -> Result<ptxsim::Counters, String> {
    let kernel = args.first().ok_or(USAGE)?;
    let (mut grid, mut block, mut shared) = ([1, 1, 1], [32, 1, 1], 0u32);
    let mut machine = ptxsim::Machine::new();
    let mut params: Vec<u8> = Vec::new();
    let push = |bytes: &[u8], params: &mut Vec<u8>| {
        while params.len() % bytes.len().max(1) != 0 {
            params.push(0);
        }
        params.extend_from_slice(bytes);
    };
    let mut i = 1;
    while i < args.len() {
        let a = &args[i];
        let value = |i: usize| args.get(i + 1).cloned().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--grid" => grid = dims(&value(i)?)?,
            "--block" => block = dims(&value(i)?)?,
            "--shared" => shared = value(i)?.parse().map_err(|e| format!("--shared: {e}"))?,
            _ => {
                let (kind, v) = a.split_once(':').ok_or(format!("bad argument {a}; {USAGE}"))?;
                let bad = |e: &dyn std::fmt::Display| format!("{a}: {e}");
                match kind {
                    "buf" => {
                        let n: usize = v.parse().map_err(|e| bad(&e))?;
                        let addr = machine.alloc(n);
                        let data: Vec<u8> = (0..n).map(|k| (k * 37 % 251 + 1) as u8).collect();
                        machine.write(addr, &data).map_err(|e| bad(&e))?;
                        push(&addr.to_le_bytes(), &mut params);
                    }
                    "u32" => push(&v.parse::<u32>().map_err(|e| bad(&e))?.to_le_bytes(), &mut params),
                    "i32" => push(&v.parse::<i32>().map_err(|e| bad(&e))?.to_le_bytes(), &mut params),
                    "f32" => push(&v.parse::<f32>().map_err(|e| bad(&e))?.to_le_bytes(), &mut params),
                    "u64" => push(&v.parse::<u64>().map_err(|e| bad(&e))?.to_le_bytes(), &mut params),
                    "pad" => params.resize(params.len() + v.parse::<usize>().map_err(|e| bad(&e))?, 0),
                    _ => return Err(format!("bad argument {a}; {USAGE}")),
                }
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    machine.launch(module, kernel, grid, block, shared, &params).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(cmd), Some(path)) = (args.get(1), args.get(2)) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    if cmd != "info" && cmd != "run" {
        eprintln!("unknown command {cmd}; {USAGE}");
        return ExitCode::from(2);
    }
    let src = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{path}: {e}");
            return ExitCode::from(1);
        }
    };
    let module = match ptxsim::Module::parse(&src) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("{path}: {e}");
            return ExitCode::from(1);
        }
    };
    if cmd == "run" {
        return match run(&module, &args[3..]) {
            Ok(counters) => {
                println!("{counters}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(1)
            }
        };
    }
    for name in module.entries() {
        let k = module.kernel(&name).expect("listed kernel exists");
        println!(
            "{name}: {} param bytes {:?}, {} B static shared (dynamic from offset {}), {} B local per thread, {} registers, {} instructions",
            k.param_bytes,
            k.params.iter().map(|p| (p.name.as_str(), p.offset, p.bytes)).collect::<Vec<_>>(),
            k.static_shared,
            k.dynamic_offset,
            k.local_bytes,
            k.num_regs,
            k.code.len()
        );
    }
    let unsupported = module.unsupported();
    for (kernel, line, op) in &unsupported {
        println!("unsupported: {kernel}, PTX line {line}: {op}");
    }
    if unsupported.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
