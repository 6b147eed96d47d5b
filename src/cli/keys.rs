//! `gatehouse keys reindex`: rewrites every blind index under `SECRET_KEY` (see
//! `crate::reindex`). Progress goes to stderr while it is a terminal; one summary line is
//! always printed on stdout. Exits 1 when some value could not be opened (run it again once
//! its key is configured), 0 otherwise, also when stopped early by `--limit`.

use std::io::{IsTerminal, Write};

use super::Failure;
use crate::config::Config;
use crate::reindex::{self, Options, Progress};

pub(super) async fn run(config: &Config, options: Options) -> anyhow::Result<()> {
    let pool = super::connect_db(config).await?;
    let terminal = std::io::stderr().is_terminal();
    let index = &config.blind_index;
    let report = |p: &Progress| {
        if terminal {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\rreindex: {}   ", p.line());
            let _ = err.flush();
        }
    };
    let result = reindex::run(&pool, &config.keyring, index, options, report).await;
    if terminal {
        eprintln!();
    }
    let p = result.map_err(|e| Failure::Service(e.to_string()))?;
    let state = if p.complete {
        "complete"
    } else {
        "stopped at --limit (run again to continue)"
    };
    println!(
        "reindex {state}: {}; {} duplicate conversation(s) retired; {} unreadable; form {}",
        p.line(),
        p.retired,
        p.unreadable,
        index.form()
    );
    if p.unreadable > 0 {
        return Err(Failure::Invalid(format!(
            "{} value(s) could not be opened with the configured ENCRYPTION_KEY/ENCRYPTION_OLD_KEYS \
             and keep their old blind index; configure their key and run `gatehouse keys reindex` again",
            p.unreadable
        ))
        .into());
    }
    Ok(())
}
