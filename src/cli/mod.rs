//! The command line: `gatehouse serve | work | migrate | dev | keys | tenants | users |
//! service-accounts | jobs | limits`. Here: the grammar's top level, the dispatch to each
//! command group's file (`keys.rs`, `tenants/` with `rotate_secret.rs` for `tenants
//! rotate-secret`, `users.rs`, `service_accounts.rs`, `jobs.rs`, `limits.rs`), and how a
//! failure becomes an exit code. The processes (`serve`, `work`, `dev`, `migrate`, config
//! loading, the runtime) are wired in `process.rs`, logging and Sentry in `telemetry.rs`.
//!
//! Exit codes: 0 success, 1 usage or validation error, 2 a service (PostgreSQL, Redis)
//! cannot be reached. Secrets are read from stdin as `name=value` lines, never from argv.

mod jobs;
mod keys;
mod limits;
mod process;
mod service_accounts;
mod stdin;
mod telemetry;
mod tenants;
mod users;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::principals::PrincipalError;

#[derive(Debug, Parser)]
#[command(
    name = "gatehouse",
    version,
    about = "The secure job backbone: ingress, workers, operators' tools"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP ingress.
    Serve,
    /// Run a worker process (every queue) until SIGTERM/SIGINT.
    Work,
    /// Apply pending migrations and exit.
    Migrate,
    /// Migrate, serve and work in one process (reads .env), for a laptop.
    Dev {
        /// The address the ingress (and `WORKER_HEALTH_PORT`) listens on: loopback unless
        /// told otherwise, since `dev` runs with `DEBUG=true`.
        #[arg(long, value_name = "ADDR", default_value_t = std::net::Ipv4Addr::LOCALHOST.into())]
        listen: std::net::IpAddr,
    },
    /// Encryption and signing keys.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Tenants.
    #[command(subcommand)]
    Tenants(tenants::TenantsCommand),
    /// Dead-letter operations.
    #[command(subcommand)]
    Jobs(jobs::JobsCommand),
    /// Users.
    #[command(subcommand)]
    Users(users::UsersCommand),
    /// Service accounts (producers).
    #[command(subcommand, name = "service-accounts")]
    ServiceAccounts(service_accounts::ServiceAccountsCommand),
    /// Rate limits: lift a lockout.
    #[command(subcommand)]
    Limits(limits::LimitsCommand),
}

/// A failure with its exit code.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Service(String),
}

fn exit_code(error: &anyhow::Error) -> u8 {
    match error.downcast_ref::<Failure>() {
        Some(Failure::Service(_)) => 2,
        _ => 1,
    }
}

/// Parses argv and runs the command.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let code = if error.use_stderr() { 1 } else { 0 };
            let _ = error.print();
            return ExitCode::from(code);
        }
    };
    if let Err(error) = run(cli) {
        eprintln!("error: {error:#}");
        return ExitCode::from(exit_code(&error));
    }
    ExitCode::SUCCESS
}

/// Hands the command to its group (or to the process wiring).
fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve => process::serve_command(),
        Command::Work => process::work_command(),
        Command::Migrate => process::migrate(),
        Command::Dev { listen } => process::dev_command(listen),
        Command::Keys(command) => keys::run(command),
        Command::Tenants(command) => tenants::run(command),
        Command::Users(command) => users::run(command),
        Command::ServiceAccounts(command) => {
            let config = process::load_config(false)?;
            process::runtime()?.block_on(service_accounts::run(&config, command))
        }
        Command::Jobs(command) => {
            let config = process::load_config(false)?;
            process::runtime()?.block_on(jobs::run(&config, command))
        }
        Command::Limits(command) => {
            let config = process::load_config(false)?;
            process::runtime()?.block_on(limits::run(&config, command))
        }
    }
}

/// An account error as a [`Failure`]: the database is a service (exit 2), the rest invalid.
fn account_failure(error: crate::accounts::AccountError) -> anyhow::Error {
    use crate::accounts::AccountError;
    match error {
        AccountError::Database(e) => Failure::Service(format!("database: {e}")).into(),
        other => Failure::Invalid(other.to_string()).into(),
    }
}

/// A principal error as a [`Failure`]: an unknown user or account is invalid (exit 1), the
/// database or the scope cache a service (exit 2).
fn principal_failure(error: PrincipalError) -> anyhow::Error {
    match error {
        PrincipalError::UnknownUser(_) | PrincipalError::UnknownServiceAccount(_) => {
            Failure::Invalid(error.to_string()).into()
        }
        PrincipalError::Database(_) | PrincipalError::Cache(_) => {
            Failure::Service(error.to_string()).into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grammar_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    fn dev_listen(args: &[&str]) -> Result<std::net::IpAddr, clap::Error> {
        let cli = Cli::try_parse_from(["gatehouse", "dev"].iter().chain(args))?;
        match cli.command {
            Command::Dev { listen } => Ok(listen),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn dev_listens_on_loopback_unless_given_another_address() {
        assert_eq!(dev_listen(&[]).expect("parses").to_string(), "127.0.0.1");
        assert_eq!(
            dev_listen(&["--listen", "0.0.0.0"])
                .expect("parses")
                .to_string(),
            "0.0.0.0"
        );
        assert_eq!(
            dev_listen(&["--listen", "::1"])
                .expect("parses")
                .to_string(),
            "::1"
        );
        assert!(dev_listen(&["--listen", "localhost"]).is_err());
        assert!(dev_listen(&["--listen", "127.0.0.1:8080"]).is_err());
    }
}
