//! The `small4` command line.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use small4::tokenizer::{ChatRequest, SpecialTokenPolicy, Tokenizer};

#[derive(Parser)]
#[command(name = "small4", version, about = "Mistral Small 4 on Hopper GPUs: kernels, reference and engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print what ptxas reported for every kernel (registers, shared memory, spills) for sm_90a.
    Resources,
    /// Print the token ids of the text on stdin (or of a chat request) as one JSON array. Stdin is taken exactly as
    /// given, without BOS: `printf 'Hello, world!' | small4 tokenize` prints [22177,1044,4304,1033].
    Tokenize {
        /// A tekken.json; default: the embedded v15 stand-in (SPEC-tokenizer.md section 7).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Encode this chat request (OpenAI/Mistral JSON) as a v15 prompt instead of reading stdin.
        #[arg(long)]
        chat: Option<PathBuf>,
    },
    /// Print the text of a JSON array of token ids read from stdin.
    Detokenize {
        /// A tekken.json; default: the embedded v15 stand-in.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Write special tokens as their strings instead of dropping them.
        #[arg(long)]
        keep_special: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Resources => print!("{}", small4::kernels::KERNEL_RESOURCES_MARKDOWN),
        Command::Tokenize { tokenizer, chat } => tokenize_command(tokenizer.as_deref(), chat.as_deref())?,
        Command::Detokenize { tokenizer, keep_special } => detokenize_command(tokenizer.as_deref(), keep_special)?,
    }
    Ok(())
}

fn load_tokenizer(path: Option<&Path>) -> anyhow::Result<Tokenizer> {
    Ok(match path {
        Some(path) => Tokenizer::from_file(path)?,
        None => Tokenizer::stand_in()?,
    })
}

/// `small4 tokenize`: stdin text (no BOS) or a chat request's prompt -> `[id, ...]`.
fn tokenize_command(tokenizer: Option<&Path>, chat: Option<&Path>) -> anyhow::Result<()> {
    let tokenizer = load_tokenizer(tokenizer)?;
    let ids = match chat {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| small4::Error::io(path, e))?;
            tokenizer.encode_chat(&ChatRequest::from_json(&text)?)?.ids
        }
        None => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text)?;
            tokenizer.encode(&text, false, false)
        }
    };
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}

/// `small4 detokenize`: `[id, ...]` on stdin -> text.
fn detokenize_command(tokenizer: Option<&Path>, keep_special: bool) -> anyhow::Result<()> {
    let tokenizer = load_tokenizer(tokenizer)?;
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input)?;
    let ids: Vec<u32> = serde_json::from_str(&input)
        .map_err(|e| small4::Error::Json { what: "token id array on stdin".into(), source: e })?;
    let policy = if keep_special { SpecialTokenPolicy::Keep } else { SpecialTokenPolicy::Ignore };
    let text = tokenizer.decode(&ids, policy)?;
    let mut stdout = std::io::stdout();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}
