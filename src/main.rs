//! The ragchat binary: the command line is `cli` (serve, migrate, create-user, seed,
//! eval, bench).

mod cli;

#[actix_web::main]
async fn main() -> std::process::ExitCode {
    cli::main().await
}
