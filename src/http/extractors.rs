//! Authentication and authorization as extractors, so a route cannot forget them.
//!
//! Credentials: `Authorization: Bearer <JWT>` (a password session) or
//! `Authorization: Bearer rck_…` (an API key). A route states what it lets an
//! API key do by the extractor it takes; there is no extractor that admits a key
//! without saying which scopes it needs:
//! - `Admitted<R>` (`admission.rs`): the scopes of the resource consumed (`R: Access`);
//! - `Scoped<A>`: routes that consume nothing, with a marker of `access`
//!   (`Scoped<access::Chat>`, `Scoped<access::Documents>`, `Scoped<access::Account>`, …);
//! - `AdminUser`: a superuser, and with a key, the `admin` scope; the /admin
//!   scope also runs `require_admin` as middleware, so every admin route is
//!   guarded before its body is read;
//! - `PasswordSession`: a JWT only (managing keys and the subscription).
//!
//! Password sessions are not limited by scopes. A key without the scope a route
//! needs gets 403 `insufficient_scope`.

use std::future::Future;
use std::marker::PhantomData;
use std::ops::Deref;
use std::pin::Pin;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::{web, FromRequest, HttpMessage, HttpRequest};
use ragchat_actors::domain::{Scope, Scopes, User};
use ragchat_actors::knowledge::Reader;

use super::AppState;
use crate::auth::{token_digest, TokenError, API_KEY_PREFIX};
use crate::error::{ApiError, ErrorCode};

/// How the caller proved who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    Jwt,
    ApiKey,
}

/// The authenticated, active user making the request, and what the credential
/// allows. Handlers receive it through `Scoped<A>`, `Admitted<R>`, `AdminUser`
/// or `PasswordSession`, each of which has checked the scopes.
#[derive(Debug, Clone)]
pub struct CurrentUser {
    pub user: User,
    pub method: AuthMethod,
    /// A key's scopes; every scope for a password session.
    pub scopes: Scopes,
}

impl CurrentUser {
    /// What this user may read in the knowledge base.
    pub fn reader(&self) -> Reader {
        Reader {
            user_id: self.user.id,
            organization_id: self.user.organization_id,
        }
    }

    /// A superuser acting with admin powers: a password session, or a key with
    /// the `admin` scope (global documents, admin routes).
    pub fn is_admin(&self) -> bool {
        self.user.is_superuser && self.scopes.contains(Scope::Admin)
    }

    /// Refuses a key that has none of the scopes `A` needs.
    pub fn require<A: Access>(&self) -> Result<(), ApiError> {
        match A::ANY_OF {
            Some(needed) if !self.scopes.intersects(needed) => Err(insufficient_scope(needed)),
            _ => Ok(()),
        }
    }
}

fn insufficient_scope(needed: Scopes) -> ApiError {
    let names: Vec<String> = needed.iter().map(|s| format!("'{s}'")).collect();
    let what = match names.as_slice() {
        [one] => format!("the {one} scope"),
        many => format!("one of the scopes {}", many.join(", ")),
    };
    ApiError::Forbidden(format!(
        "This API key lacks {what}: create a key with it (POST /auth/api-keys) or sign in"
    ))
    .with_code(ErrorCode::InsufficientScope)
}

/// What a route lets an API key do: it needs one of `ANY_OF`; None: any valid
/// key (the caller's own account). Password sessions pass every check.
pub trait Access: 'static {
    const ANY_OF: Option<Scopes>;
}

/// The markers of `Scoped<A>`, one per kind of route.
pub mod access {
    use ragchat_actors::domain::{Scope, Scopes};

    use super::Access;

    /// Conversations: `/chat/*`, `/ws/chat`.
    pub struct Chat;
    impl Access for Chat {
        const ANY_OF: Option<Scopes> = Some(Scopes::of(&[Scope::Chat]));
    }

    /// Reading documents: a key that searches them or one that adds them.
    pub struct Documents;
    impl Access for Documents {
        const ANY_OF: Option<Scopes> = Some(Scopes::of(&[Scope::Search, Scope::Ingest]));
    }

    /// Changing the knowledge base: adding and deleting documents.
    pub struct Ingest;
    impl Access for Ingest {
        const ANY_OF: Option<Scopes> = Some(Scopes::of(&[Scope::Ingest]));
    }

    /// The admin routes (with a superuser: `AdminUser` checks both).
    pub struct Admin;
    impl Access for Admin {
        const ANY_OF: Option<Scopes> = Some(Scopes::of(&[Scope::Admin]));
    }

    /// The caller's own account, read only (`/auth/me`, usage, the plan, the
    /// models served): any key.
    pub struct Account;
    impl Access for Account {
        const ANY_OF: Option<Scopes> = None;
    }
}

/// An authenticated user whose credential allows what `A` names.
pub struct Scoped<A: Access> {
    pub current: CurrentUser,
    _access: PhantomData<A>,
}

impl<A: Access> Scoped<A> {
    pub fn into_inner(self) -> CurrentUser {
        self.current
    }
}

impl<A: Access> Deref for Scoped<A> {
    type Target = CurrentUser;

    fn deref(&self) -> &CurrentUser {
        &self.current
    }
}

impl<A: Access> FromRequest for Scoped<A> {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Self::Error>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let current = authenticate(req).await?;
            current.require::<A>()?;
            Ok(Scoped {
                current,
                _access: PhantomData,
            })
        })
    }
}

/// A user signed in with their password (a JWT), not an API key: for managing
/// API keys and the subscription.
#[derive(Debug, Clone)]
pub struct PasswordSession(pub CurrentUser);

impl FromRequest for PasswordSession {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Self::Error>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let current = authenticate(req).await?;
            match current.method {
                AuthMethod::Jwt => Ok(PasswordSession(current)),
                AuthMethod::ApiKey => Err(ApiError::Forbidden(
                    "This needs a signed-in user (an access token from /auth/login), not an API key".into(),
                )
                .with_code(ErrorCode::PasswordSessionRequired)),
            }
        })
    }
}

/// An authenticated superuser acting with admin powers (a password session, or
/// a key with the `admin` scope).
#[derive(Debug, Clone)]
pub struct AdminUser(pub CurrentUser);

/// The client's address: the last entry of the configured proxy header
/// (`server.client_ip_header`, set by a trusted load balancer), else the peer.
pub fn client_address(req: &HttpRequest, header: &str) -> String {
    let from_header = (!header.is_empty())
        .then(|| req.headers().get(header))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty() && v.len() <= 64);
    from_header
        .or_else(|| req.peer_addr().map(|a| a.ip().to_string()))
        .unwrap_or_else(|| "unknown".into())
}

pub fn bearer(req: &HttpRequest) -> Result<String, ApiError> {
    let value = req
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or_else(|| ApiError::Unauthorized("Not authenticated".into()))?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::Unauthorized("Invalid authorization header".into()))?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => {
            Ok(token.trim().to_string())
        }
        _ => Err(ApiError::Unauthorized(
            "Invalid authorization header: expected 'Bearer <token>'".into(),
        )),
    }
}

/// The caller, authenticated once per request (kept in the request's extensions).
/// Private: routes get it through an extractor that checks the scopes.
pub(super) async fn authenticate(req: HttpRequest) -> Result<CurrentUser, ApiError> {
    if let Some(cached) = req.extensions().get::<CurrentUser>() {
        return Ok(cached.clone());
    }
    let state = req
        .app_data::<web::Data<AppState>>()
        .ok_or_else(|| ApiError::internal("application state missing"))?
        .clone();
    let token = bearer(&req)?;
    let current = user_for_token(&state, &token).await?;
    req.extensions_mut().insert(current.clone());
    Ok(current)
}

/// The active user a bearer token belongs to, if the token allows what `A` names
/// (for callers that are not an extractor: the WebSocket).
pub async fn authorize<A: Access>(state: &AppState, token: &str) -> Result<CurrentUser, ApiError> {
    let current = user_for_token(state, token).await?;
    current.require::<A>()?;
    Ok(current)
}

/// A superuser with admin powers the token belongs to (for `/metrics`).
pub async fn authorize_admin(state: &AppState, token: &str) -> Result<AdminUser, ApiError> {
    require_superuser(user_for_token(state, token).await?)
}

/// The active user a bearer token (JWT or API key) belongs to.
async fn user_for_token(state: &AppState, token: &str) -> Result<CurrentUser, ApiError> {
    let (user_id, method, scopes) = if token.starts_with(API_KEY_PREFIX) {
        let key = state
            .accounts
            .use_api_key(&token_digest(token))
            .await?
            .ok_or_else(|| ApiError::Unauthorized("Invalid API key".into()))?;
        (key.user_id, AuthMethod::ApiKey, key.scopes)
    } else {
        let claims = state.tokens.verify(token).map_err(|e| match e {
            TokenError::Expired => {
                ApiError::Unauthorized("Token has expired".into()).with_code(ErrorCode::TokenExpired)
            }
            _ => ApiError::Unauthorized("Could not validate credentials".into()),
        })?;
        // A token of a login that has ended (logout) stops with it: at once on
        // this node, within `auth.login_cache_ms` on another.
        if let Some(sid) = claims.sid {
            if state.logins.has_ended(state.accounts.as_ref(), sid).await? {
                return Err(
                    ApiError::Unauthorized("This login has ended (logged out): sign in again".into())
                        .with_code(ErrorCode::TokenRevoked),
                );
            }
        }
        (claims.sub, AuthMethod::Jwt, Scopes::ALL)
    };
    // The row is cached for `sessions.user_cache_ms` (changes on this node forget it at once).
    let user = state
        .registry
        .deps()
        .users
        .get(state.accounts.as_ref(), user_id)
        .await?
        .ok_or_else(|| ApiError::Unauthorized("Could not validate credentials".into()))?;
    if !user.is_active {
        return Err(ApiError::Forbidden("User account is deactivated".into()).with_code(ErrorCode::AccountDeactivated));
    }
    Ok(CurrentUser {
        user: user.as_ref().clone(),
        method,
        scopes,
    })
}

/// A superuser; with a key, one that has the `admin` scope.
fn require_superuser(current: CurrentUser) -> Result<AdminUser, ApiError> {
    if !current.user.is_superuser {
        return Err(ApiError::Forbidden("Admin privileges required".into()).with_code(ErrorCode::AdminRequired));
    }
    current.require::<access::Admin>()?;
    Ok(AdminUser(current))
}

impl FromRequest for AdminUser {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Self::Error>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move { require_superuser(authenticate(req).await?) })
    }
}

/// Middleware for the /admin scope: authenticates and checks is_superuser before
/// any extractor reads the body, so a malformed body never masks a 401/403.
pub async fn require_admin(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody + 'static>>, actix_web::Error> {
    // The cloned request must be dropped before `next.call`: routing needs it unshared.
    let verdict = authenticate(req.request().clone()).await.and_then(require_superuser);
    match verdict {
        Ok(_) => Ok(next.call(req).await?.map_into_left_body()),
        Err(e) => Ok(req.error_response(e).map_into_right_body()),
    }
}
