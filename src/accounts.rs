//! Account operations shared by the CLI and start-up: creating users and seeding
//! the demo users of the development environment.

use ragchat_actors::domain::{Email, NewUser, User};
use ragchat_actors::plans::Plan;
use ragchat_actors::ports::{AccountStore, StoreError};

use crate::auth::PasswordHasher;

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("{0}")]
    Invalid(String),
    #[error("a user with e-mail {0} already exists")]
    Exists(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct UserSpec<'a> {
    pub email: &'a str,
    pub password: &'a str,
    pub plan: Plan,
    pub superuser: bool,
}

/// Creates a verified user (CLI and seeding; the HTTP register route makes
/// unverified free users).
pub async fn create_user(
    store: &dyn AccountStore,
    hasher: &PasswordHasher,
    spec: UserSpec<'_>,
) -> Result<User, AccountError> {
    let email = Email::parse(spec.email).map_err(|e| AccountError::Invalid(e.to_string()))?;
    if spec.password.chars().count() < crate::auth::passwords::MIN_PASSWORD_LEN {
        return Err(AccountError::Invalid(format!(
            "password must be at least {} characters",
            crate::auth::passwords::MIN_PASSWORD_LEN
        )));
    }
    let hashed_password = hasher
        .hash(spec.password)
        .map_err(|e| AccountError::Invalid(e.to_string()))?;
    store
        .create_user(NewUser {
            email: email.clone(),
            hashed_password,
            full_name: None,
            is_superuser: spec.superuser,
            is_verified: true,
            subscription_plan: spec.plan,
            organization_id: None,
        })
        .await
        .map_err(|e| match e {
            StoreError::Conflict(_) => AccountError::Exists(email.to_string()),
            other => AccountError::Store(other),
        })
}

/// The original design's demo accounts. Seeded only outside production.
pub const DEMO_USERS: [(&str, &str, Plan, bool); 3] = [
    ("admin@example.com", "adminpassword123", Plan::Enterprise, true),
    ("test@example.com", "testpassword123", Plan::Pro, false),
    ("free@example.com", "freepassword123", Plan::Free, false),
];

pub async fn seed_demo_users(store: &dyn AccountStore, hasher: &PasswordHasher) -> Result<usize, AccountError> {
    let mut created = 0;
    for (email, password, plan, superuser) in DEMO_USERS {
        if store.user_by_email(email).await?.is_some() {
            continue;
        }
        match create_user(
            store,
            hasher,
            UserSpec {
                email,
                password,
                plan,
                superuser,
            },
        )
        .await
        {
            Ok(_) => created += 1,
            Err(AccountError::Exists(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(created)
}
