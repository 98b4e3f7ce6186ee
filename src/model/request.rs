//! What a caller of the engine hands it and gets back: a [`Request`] and how it samples ([`Sampling`]), the handle
//! [`RequestId`], each generated [`StepToken`] and why a request finished ([`FinishReason`]), and the experts a step
//! routed to ([`StepRouting`]). Re-exported by [`crate::model::engine`].

use crate::model::ModelConfig;
use crate::{Error, Result};

/// How a request picks its tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampling {
    /// The highest logit (the lowest id among ties).
    Greedy,
    /// Temperature + top-p with a seed: the samples depend on (seed, step) only, not on the batch.
    Seeded {
        /// Divides the logits before the softmax; finite and at least 0 (0 picks greedily).
        temperature: f32,
        /// Probability mass of the most likely tokens kept (nucleus), in (0, 1]; 1 keeps every token.
        top_p: f32,
        /// The request's seed.
        seed: u64,
    },
}

impl Sampling {
    /// Checks the settings: `Error::InvalidArgument` for a temperature that is not finite or is below 0, or a top-p
    /// outside (0, 1] (NaN included). [`Engine::add`] and `small4 generate` refuse such settings with this error.
    ///
    /// ```
    /// use small4::model::engine::Sampling;
    ///
    /// let seeded = |temperature, top_p| Sampling::Seeded { temperature, top_p, seed: 7 };
    /// assert!(Sampling::Greedy.validate().is_ok());
    /// assert!(seeded(0.7, 0.9).validate().is_ok() && seeded(0.0, 1.0).validate().is_ok());
    /// for bad in [seeded(f32::NAN, 1.0), seeded(f32::INFINITY, 1.0), seeded(-0.5, 1.0), seeded(1.0, 0.0), seeded(1.0, 5.0), seeded(1.0, f32::NAN)] {
    ///     assert!(matches!(bad.validate(), Err(small4::Error::InvalidArgument(_))), "{bad:?}");
    /// }
    /// ```
    ///
    /// [`Engine::add`]: crate::model::engine::Engine::add
    pub fn validate(&self) -> Result<()> {
        let Sampling::Seeded { temperature, top_p, .. } = *self else { return Ok(()) };
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(Error::InvalidArgument(format!("sampling temperature {temperature}: must be finite and at least 0")));
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(Error::InvalidArgument(format!("sampling top_p {top_p}: must be in (0, 1]")));
        }
        Ok(())
    }
}

/// A generation request.
#[derive(Clone, Debug)]
pub struct Request {
    /// Prompt token ids, non-empty and below the vocabulary size.
    pub prompt: Vec<u32>,
    /// Tokens to generate at most: at least 1, and the prompt plus these must fit the model's positions
    /// (`ModelConfig::max_position`).
    pub max_tokens: usize,
    /// How each token is picked.
    pub sampling: Sampling,
}

impl Request {
    /// Checks the request against a model before anything runs: `Error::InvalidArgument` for an empty prompt,
    /// `max_tokens` 0 or invalid sampling settings ([`Sampling::validate`]); `Error::OutOfRange` for a token id at or
    /// above the vocabulary size, or a last generated token whose position would reach `config.max_position` (the
    /// prompt's tokens take positions `0..prompt.len()`, the generated ones the next `max_tokens`).
    ///
    /// ```
    /// use small4::model::engine::{Request, Sampling};
    /// use small4::model::ModelConfig;
    /// use small4::Error;
    ///
    /// let config = ModelConfig::tiny();
    /// let request = |prompt: Vec<u32>, max_tokens| Request { prompt, max_tokens, sampling: Sampling::Greedy };
    /// request(vec![1, 300], 16).validate(&config)?;
    /// assert!(matches!(request(vec![], 16).validate(&config), Err(Error::InvalidArgument(_))));
    /// assert!(matches!(request(vec![1, 300], 0).validate(&config), Err(Error::InvalidArgument(_))));
    /// assert!(matches!(request(vec![1, config.vocab as u32], 1).validate(&config), Err(Error::OutOfRange { .. })));
    /// // The last position the request may reach is max_position - 1.
    /// request(vec![1, 300], config.max_position - 2).validate(&config)?;
    /// match request(vec![1, 300], config.max_position - 1).validate(&config) {
    ///     Err(Error::OutOfRange { index, limit, .. }) => assert_eq!((index, limit), (config.max_position as i64, config.max_position as i64)),
    ///     other => panic!("expected OutOfRange, got {other:?}"),
    /// }
    /// assert!(request(vec![1, 300], usize::MAX).validate(&config).is_err()); // no overflow
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn validate(&self, config: &ModelConfig) -> Result<()> {
        if self.prompt.is_empty() {
            return Err(Error::InvalidArgument("empty prompt".into()));
        }
        if self.max_tokens == 0 {
            return Err(Error::InvalidArgument("max_tokens is 0: a request generates at least one token".into()));
        }
        if let Some(&bad) = self.prompt.iter().find(|&&t| t as usize >= config.vocab) {
            return Err(Error::OutOfRange { what: "prompt token id".into(), index: bad as i64, limit: config.vocab as i64 });
        }
        let last_position = (self.prompt.len() - 1).saturating_add(self.max_tokens);
        if last_position >= config.max_position {
            return Err(Error::OutOfRange {
                what: format!("position of the last generated token ({} prompt + {} generated tokens)", self.prompt.len(), self.max_tokens),
                index: i64::try_from(last_position).unwrap_or(i64::MAX),
                limit: config.max_position as i64,
            });
        }
        self.sampling.validate()
    }
}

/// An engine's handle on a request, assigned by [`Engine::add`] in increasing order.
///
/// [`Engine::add`]: crate::model::engine::Engine::add
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// Why a request left the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// It generated the stop token (`EngineOptions::eos`), which is its last token.
    Eos,
    /// It generated `Request::max_tokens` tokens.
    MaxTokens,
}

/// One generated token of one request.
#[derive(Clone, Debug)]
pub struct StepToken {
    /// The request it belongs to.
    pub id: RequestId,
    /// The token id.
    pub token: u32,
    /// Set on the request's last token (the request has left the batch).
    pub finished: Option<FinishReason>,
    /// The f32 logits the token was chosen from, when `EngineOptions::keep_logits`.
    pub logits: Option<Vec<f32>>,
}

/// The experts every layer routed each token of a step to ([`Engine::last_routing`], with
/// `EngineOptions::record_routing`): what a teacher-forced comparison gives the CPU reference
/// (`ReferenceModel::forward_routed`), so that a router near-tie cannot make the two run different experts.
///
/// [`Engine::last_routing`]: crate::model::engine::Engine::last_routing
#[derive(Clone, Debug, PartialEq)]
pub struct StepRouting {
    /// Experts per token.
    pub k: usize,
    /// The step's sequences in batch order and the rows of their tokens: the request of each (None in a batch of
    /// [`Engine::forward_logits`], whose order is the caller's).
    ///
    /// [`Engine::forward_logits`]: crate::model::engine::Engine::forward_logits
    pub sequences: Vec<(Option<RequestId>, std::ops::Range<usize>)>,
    /// Per layer, `[tokens, k]` global expert ids of the step's tokens, best first (the router's `topk_ids`).
    pub ids: Vec<Vec<i32>>,
}

impl StepRouting {
    /// Per layer, the ids of the tokens `rows` (`[rows.len(), k]`), the form `ReferenceModel::forward_routed` takes;
    /// `Error::OutOfRange` past the step's tokens.
    ///
    /// ```
    /// use small4::model::engine::{RequestId, StepRouting};
    ///
    /// // Two layers, k = 2, a step of two requests: request 7 fed 1 token, request 3 fed 2.
    /// let routing = StepRouting {
    ///     k: 2,
    ///     sequences: vec![(Some(RequestId(7)), 0..1), (Some(RequestId(3)), 1..3)],
    ///     ids: vec![vec![0, 1, 2, 3, 4, 5], vec![10, 11, 12, 13, 14, 15]],
    /// };
    /// assert_eq!(routing.rows(1..3)?, [vec![2, 3, 4, 5], vec![12, 13, 14, 15]]);
    /// assert_eq!(routing.of_request(RequestId(7)), Some(vec![vec![0, 1], vec![10, 11]]));
    /// assert_eq!(routing.of_request(RequestId(1)), None);
    /// assert!(routing.rows(2..4).is_err());
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn rows(&self, rows: std::ops::Range<usize>) -> Result<Vec<Vec<i32>>> {
        let tokens = self.ids.first().map_or(0, |ids| ids.len() / self.k.max(1));
        if rows.start > rows.end || rows.end > tokens {
            return Err(Error::OutOfRange { what: "routing rows".into(), index: rows.end as i64, limit: tokens as i64 });
        }
        Ok(self.ids.iter().map(|ids| ids[rows.start * self.k..rows.end * self.k].to_vec()).collect())
    }

    /// [`StepRouting::rows`] of `request`'s tokens in the step; None when it was not in the step.
    pub fn of_request(&self, request: RequestId) -> Option<Vec<Vec<i32>>> {
        let (_, rows) = self.sequences.iter().find(|(id, _)| *id == Some(request))?;
        self.rows(rows.clone()).ok()
    }
}
