//! The ragchat binary: the command line is `cli` (serve, migrate, create-user, seed,
//! eval, bench), and the hidden `__extract-pdf` that reads one PDF in a child process.

mod cli;

fn main() -> std::process::ExitCode {
    // The PDF reader's child process (see `knowledge::pdf`): before any runtime or
    // thread, so its resource limits cover all it does.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == ragchat::knowledge::pdf::SUBCOMMAND)
    {
        let rest: Vec<String> = std::env::args_os()
            .skip(2)
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        return ragchat::knowledge::pdf::child_main(&rest);
    }
    actix_web::rt::System::new().block_on(cli::main())
}
