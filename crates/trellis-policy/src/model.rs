//! The policy file as written: serde structs with every scalar [`Located`], so that
//! validation (in `compile`) can point at the exact line and column of a bad value.
//! Unknown fields are rejected here, by serde, with their position.

use serde::Deserialize;

use crate::located::Located;

/// One policy file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawPolicy {
    pub api_version: Located,
    pub kind: Located,
    #[serde(default)]
    pub default_action: Option<Located>,
    #[serde(default)]
    pub mode: Option<Located>,
    #[serde(default)]
    pub path_parameters: Option<Located>,
    #[serde(default)]
    pub case_insensitive_paths: Option<Located>,
    #[serde(default)]
    pub rules: Vec<RawRule>,
}

/// One entry of `rules`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRule {
    pub name: Located,
    pub action: Located,
    #[serde(default)]
    pub mode: Option<Located>,
    pub from: Vec<Located>,
    #[serde(default)]
    pub to: Option<Vec<RawTo>>,
    #[serde(default)]
    pub ports: Option<Vec<Located>>,
}

/// One entry of a rule's `to`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTo {
    #[serde(default)]
    pub methods: Option<Vec<Located>>,
    #[serde(default)]
    pub paths: Option<Vec<Located>>,
}
