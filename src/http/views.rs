//! Response shapes shared by several route modules.

use chrono::{DateTime, Utc};
use ragchat_actors::domain::User;
use ragchat_actors::plans::Plan;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// A user as the API shows it: every field except the password hash.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UserView {
    pub id: Uuid,
    pub email: String,
    pub full_name: Option<String>,
    pub is_active: bool,
    pub is_verified: bool,
    pub is_superuser: bool,
    #[schema(value_type = String, example = "free")]
    pub subscription_plan: Plan,
    pub organization_id: Option<Uuid>,
    #[schema(value_type = Object)]
    pub preferences: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<User> for UserView {
    fn from(u: User) -> Self {
        UserView {
            id: u.id,
            email: u.email,
            full_name: u.full_name,
            is_active: u.is_active,
            is_verified: u.is_verified,
            is_superuser: u.is_superuser,
            subscription_plan: u.subscription_plan,
            organization_id: u.organization_id,
            preferences: u.preferences,
            created_at: u.created_at,
            updated_at: u.updated_at,
        }
    }
}
