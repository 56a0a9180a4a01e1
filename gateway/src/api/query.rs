//! Queries of enrollments and groups, and the paging every query shares
//! (`x-ms-max-item-count`, `x-ms-continuation`).

use super::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use dps_core::validate::parse_json;
use serde_json::Value;

impl ServiceApi {
    /// Page size and start position from `x-ms-max-item-count` and `x-ms-continuation`.
    pub(super) fn paging(&self, req: &Request) -> Result<(usize, Option<String>), ServiceError> {
        let l = &self.svc.limits;
        let size = match req.header("x-ms-max-item-count") {
            None => l.default_page_size,
            Some(v) => match v.trim().parse::<i64>() {
                Ok(n) if n > 0 => (n as usize).min(l.max_page_size),
                Ok(_) => l.default_page_size,
                Err(_) => return Err(ServiceError::invalid("x-ms-max-item-count must be an integer")),
            },
        };
        let after = match req.header("x-ms-continuation").filter(|v| !v.is_empty()) {
            None => None,
            Some(t) => Some(
                B64URL
                    .decode(t.trim())
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| ServiceError::invalid("x-ms-continuation is not a token this service issued"))?,
            ),
        };
        Ok((size, after))
    }

    pub(super) fn check_query_body(req: &Request) -> Result<(), ServiceError> {
        // Python sends no body for the registration query, others `{"query":"*"}`; DPS has no
        // query language, so any query string returns every item of the collection.
        if !req.body.iter().all(u8::is_ascii_whitespace) {
            parse_json::<QuerySpecification>(&req.body)?;
        }
        Ok(())
    }

    pub(super) fn page_response(items: Vec<Value>, next: Option<String>, size: usize, item_type: &str) -> Response {
        let mut r = json(200, &items).header("x-ms-item-type", item_type).header("x-ms-max-item-count", size.to_string());
        // Never an empty continuation header on the last page: Node would loop forever.
        if let Some(k) = next {
            r = r.header("x-ms-continuation", B64URL.encode(k));
        }
        r
    }

    pub(super) async fn query(&self, table: Table, req: &Request) -> Handled {
        Self::check_query_body(req)?;
        let (size, after) = self.paging(req)?;
        let mut rows = self.svc.store.scan(table, "", after.as_deref(), size + 1).await?;
        let next = (rows.len() > size).then(|| rows.truncate(size)).and_then(|_| rows.last().map(|(k, _)| k.clone()));
        let mut items = Vec::with_capacity(rows.len());
        for (_, r) in &rows {
            let v = if table == Table::Enrollments {
                serde_json::to_value(enrollment_view(r.parse()?))
            } else {
                serde_json::to_value(group_view(r.parse()?))
            };
            items.push(v.map_err(|_| ServiceError::new(ErrorKind::Internal, "serialisation failed"))?);
        }
        let item_type = if table == Table::Enrollments { "enrollment" } else { "enrollmentGroup" };
        Ok(Self::page_response(items, next, size, item_type))
    }
}
