//! `ragchat create-user`: one account, from the command line.

use ragchat::accounts::{create_user, UserSpec};
use ragchat::auth::PasswordHasher;
use ragchat::config::Settings;
use ragchat::stores;
use ragchat_actors::plans::Plan;

// No doc comment here: the subcommand's help is the one on `Command::CreateUser`.
#[derive(Debug, clap::Args)]
pub struct CreateUserArgs {
    #[arg(long)]
    email: String,
    #[arg(long, env = "RAGCHAT_NEW_USER_PASSWORD", hide_env_values = true)]
    password: String,
    #[arg(long, default_value = "free")]
    plan: Plan,
    #[arg(long)]
    superuser: bool,
}

pub async fn run(args: CreateUserArgs, settings: Settings) -> anyhow::Result<()> {
    let CreateUserArgs {
        email,
        password,
        plan,
        superuser,
    } = args;
    let store = stores::connect_accounts(&settings.database).await?;
    let hasher = PasswordHasher::new(settings.auth.argon2)?;
    let user = create_user(
        store.as_ref(),
        &hasher,
        UserSpec {
            email: &email,
            password: &password,
            plan,
            superuser,
        },
    )
    .await?;
    println!(
        "created user {} ({}, plan {}{})",
        user.email,
        user.id,
        user.subscription_plan,
        if superuser { ", superuser" } else { "" }
    );
    Ok(())
}
