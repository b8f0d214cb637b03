//! Knowledge base domain: documents, their chunks (with embeddings), and who may
//! see them.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Who a document belongs to: a user, an organization (all its members see it), or
/// everybody (seeded by admins).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Owner {
    User(Uuid),
    Organization(Uuid),
    Global,
}

impl fmt::Display for Owner {
    /// The key stores keep: `user:<id>`, `org:<id>` or `global`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::User(id) => write!(f, "user:{id}"),
            Owner::Organization(id) => write!(f, "org:{id}"),
            Owner::Global => f.write_str("global"),
        }
    }
}

impl FromStr for Owner {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let id = |v: &str| Uuid::parse_str(v).map_err(|e| format!("owner '{s}': {e}"));
        match s.split_once(':') {
            Some(("user", v)) => Ok(Owner::User(id(v)?)),
            Some(("org", v)) => Ok(Owner::Organization(id(v)?)),
            None if s == "global" => Ok(Owner::Global),
            _ => Err(format!("owner '{s}' is not user:<id>, org:<id> or global")),
        }
    }
}

/// The caller of a listing or a search: sees their own documents, their
/// organization's, and the global ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reader {
    pub user_id: Uuid,
    pub organization_id: Option<Uuid>,
}

impl Reader {
    pub fn may_see(&self, owner: &Owner) -> bool {
        match owner {
            Owner::User(u) => *u == self.user_id,
            Owner::Organization(o) => Some(*o) == self.organization_id,
            Owner::Global => true,
        }
    }

    /// The owner keys this reader may see (for store queries).
    pub fn owners(&self) -> Vec<Owner> {
        let mut v = vec![Owner::User(self.user_id), Owner::Global];
        if let Some(o) = self.organization_id {
            v.push(Owner::Organization(o));
        }
        v
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub id: Uuid,
    pub owner: Owner,
    pub title: String,
    /// Where it came from: a file name, a URL, a corpus id.
    pub source: String,
    /// How it reached the knowledge base: `api` (the JSON route), `upload:<format>`
    /// (`upload:pdf`, `upload:markdown`, …), `seed` (an administrator's corpus);
    /// empty for documents stored before this was recorded.
    pub origin: String,
    /// SHA-256 of the text, hex: the same text is stored once per owner.
    pub content_hash: String,
    /// Bytes of text stored (counted against the storage quota).
    pub size_bytes: u64,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub chunk_count: u32,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    pub id: Uuid,
    pub document_id: Uuid,
    /// Position in the document, from 0.
    pub ordinal: u32,
    pub content: String,
    pub embedding: Vec<f32>,
}

/// f32 vector ⇄ little-endian bytes, the stored form of an embedding.
pub fn embedding_to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn embedding_from_bytes(b: &[u8]) -> Option<Vec<f32>> {
    b.len().is_multiple_of(4).then(|| {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_round_trip_through_their_keys() {
        let id = Uuid::new_v4();
        for o in [Owner::User(id), Owner::Organization(id), Owner::Global] {
            assert_eq!(o.to_string().parse::<Owner>(), Ok(o));
        }
        assert!("team:x".parse::<Owner>().is_err());
        assert!("user:not-a-uuid".parse::<Owner>().is_err());
    }

    #[test]
    fn readers_see_their_own_their_organizations_and_global_documents() {
        let (me, other, org, other_org) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let r = Reader {
            user_id: me,
            organization_id: Some(org),
        };
        assert!(r.may_see(&Owner::User(me)));
        assert!(!r.may_see(&Owner::User(other)));
        assert!(r.may_see(&Owner::Organization(org)));
        assert!(!r.may_see(&Owner::Organization(other_org)));
        assert!(r.may_see(&Owner::Global));
        let loner = Reader {
            user_id: me,
            organization_id: None,
        };
        assert!(!loner.may_see(&Owner::Organization(org)));
        assert_eq!(loner.owners().len(), 2);
    }

    #[test]
    fn embeddings_round_trip_as_bytes() {
        let v = vec![0.5f32, -1.25, 3.0e-7];
        assert_eq!(embedding_from_bytes(&embedding_to_bytes(&v)), Some(v));
        assert_eq!(embedding_from_bytes(&[1, 2, 3]), None);
    }
}
