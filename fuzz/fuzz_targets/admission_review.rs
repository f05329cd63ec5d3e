//! An AdmissionReview body → the webhook's pure `review` must not panic; the answer echoes
//! the uid, is `allowed: false` exactly on error, carries the patch exactly when injecting;
//! and that patch applies to the pod (with json-patch, as the API server does) leaving one
//! `trellis-sidecar` container.
#![no_main]

use serde_json::Value;
use trellis_control::webhook::inject::{fuzz_review, SIDECAR_CONTAINER};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((pod, patch)) = fuzz_review(data) else {
        return;
    };
    let patch: json_patch::Patch =
        serde_json::from_value(Value::Array(patch)).expect("the patch is a JSONPatch");
    let mut after = pod.clone();
    if let Err(e) = json_patch::patch(&mut after, &patch) {
        panic!("patch does not apply: {e}\npod: {pod}\npatch: {patch:?}");
    }
    // Native form: among the init containers; fallback form: among the containers.
    let sidecars: usize = ["initContainers", "containers"]
        .iter()
        .map(|list| {
            after["spec"][*list]
                .as_array()
                .map(|cs| cs.iter().filter(|c| c["name"] == SIDECAR_CONTAINER).count())
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(sidecars, 1, "pod after the patch: {after}");
});
