//! Authentication as extractors, so a route cannot forget it.
//!
//! `CurrentUser` accepts `Authorization: Bearer <JWT>` or `Authorization: Bearer
//! rck_…` (an API key). `AdminUser` additionally requires `is_superuser`; the
//! /admin scope also runs `require_admin` as middleware, so every admin route is
//! guarded before its body is read.

use std::future::Future;
use std::pin::Pin;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::{web, FromRequest, HttpMessage, HttpRequest};
use ragchat_actors::domain::User;
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

/// The authenticated, active user making the request.
#[derive(Debug, Clone)]
pub struct CurrentUser {
    pub user: User,
    pub method: AuthMethod,
}

impl CurrentUser {
    /// What this user may read in the knowledge base.
    pub fn reader(&self) -> Reader {
        Reader {
            user_id: self.user.id,
            organization_id: self.user.organization_id,
        }
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

/// An authenticated superuser.
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

async fn authenticate(req: HttpRequest) -> Result<CurrentUser, ApiError> {
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

/// The active user a bearer token (JWT or API key) belongs to.
pub async fn user_for_token(state: &AppState, token: &str) -> Result<CurrentUser, ApiError> {
    let (user_id, method) = if token.starts_with(API_KEY_PREFIX) {
        let key = state
            .accounts
            .use_api_key(&token_digest(token))
            .await?
            .ok_or_else(|| ApiError::Unauthorized("Invalid API key".into()))?;
        (key.user_id, AuthMethod::ApiKey)
    } else {
        let claims = state.tokens.verify(token).map_err(|e| match e {
            TokenError::Expired => {
                ApiError::Unauthorized("Token has expired".into()).with_code(ErrorCode::TokenExpired)
            }
            _ => ApiError::Unauthorized("Could not validate credentials".into()),
        })?;
        (claims.sub, AuthMethod::Jwt)
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
    })
}

fn require_superuser(current: CurrentUser) -> Result<AdminUser, ApiError> {
    if current.user.is_superuser {
        Ok(AdminUser(current))
    } else {
        Err(ApiError::Forbidden("Admin privileges required".into()).with_code(ErrorCode::AdminRequired))
    }
}

impl FromRequest for CurrentUser {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Self::Error>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        Box::pin(authenticate(req.clone()))
    }
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
