//! `ptxsim info FILE.ptx`: the kernels of a PTX module as the interpreter sees them (parameters, shared and local
//! memory, registers, instructions) and every instruction it cannot run, with its line. Exits non-zero if any.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(cmd), Some(path)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: ptxsim info FILE.ptx");
        return ExitCode::from(2);
    };
    if cmd != "info" {
        eprintln!("unknown command {cmd}; usage: ptxsim info FILE.ptx");
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
