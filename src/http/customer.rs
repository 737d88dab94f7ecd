//! Customer routes: create, cancel and read trips (the demo, the simulator and the tests
//! use them to make offers).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Map, Value, json};

use super::{AppState, json_body};
use crate::accept::uuid_field;
use crate::auth::{AuthUser, Role};
use crate::domain::{LatLng, Receiver, TripType};
use crate::error::{ApiError, Envelope, FieldError};
use crate::storage::trips::NewTrip;

/// The customer routes.
pub fn routes(state: &AppState) -> Router {
    let body = super::BodyRead::of(&state.config);
    let create = Router::new()
        .route("/api/customer/ride/create", post(create))
        .route("/api/customer/ride/cancel/{id}", post(cancel))
        .route_layer(axum::middleware::from_fn_with_state(body, super::read_body))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), super::customers));
    let read = Router::new()
        .route("/api/customer/ride/details/{id}", get(details))
        .route_layer(axum::middleware::from_fn_with_state(body, super::read_body))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            super::customers_or_admins,
        ));
    create.merge(read).with_state(state.clone())
}

async fn create(
    State(state): State<AppState>,
    Extension(user): Extension<AuthUser>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = json_body(&headers, body)?;
    let trip = parse_new_trip(&body, &user.id)?;
    state.shard_health.ready(state.shards.index_of(&trip.customer_id))?;
    match state.shards.for_id(&trip.customer_id).create_trip(&trip).await? {
        Ok(id) => Ok(Json(Envelope::ok(
            "default_store_200",
            "Trip request created.",
            json!({"id": id, "current_status": "pending"}),
        ))
        .into_response()),
        Err(field) => Err(ApiError::invalid(
            field,
            format!("The selected {field} does not exist."),
        )),
    }
}

async fn cancel(
    State(state): State<AppState>,
    Extension(user): Extension<AuthUser>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = path_uuid(&id)?;
    state.shard_health.ready(state.shards.index_of(&id))?;
    let owner = state
        .shards
        .for_id(&id)
        .trip_owner(&id)
        .await?
        .ok_or(ApiError::TripNotFound)?;
    if owner != user.id {
        return Err(ApiError::NotYourTrip);
    }
    if !state.shards.for_id(&id).cancel_trip(&id).await? {
        return Err(ApiError::TripNotPending);
    }
    Ok(Json(Envelope::ok(
        "default_update_200",
        "Trip request cancelled.",
        json!({"id": id, "current_status": "cancelled"}),
    ))
    .into_response())
}

async fn details(
    State(state): State<AppState>,
    Extension(user): Extension<AuthUser>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = path_uuid(&id)?;
    state.shard_health.ready(state.shards.index_of(&id))?;
    let trip = state
        .shards
        .for_id(&id)
        .trip_details(&id)
        .await?
        .ok_or(ApiError::TripNotFound)?;
    if user.role != Role::Admin && trip["customer_id"].as_str() != Some(user.id.as_str()) {
        return Err(ApiError::NotYourTrip);
    }
    Ok(Json(Envelope::ok("default_200", "Trip request details.", trip)).into_response())
}

fn path_uuid(id: &str) -> Result<String, ApiError> {
    uuid::Uuid::parse_str(id)
        .map(|u| u.to_string())
        .map_err(|_| ApiError::invalid("id", "The id must be a valid UUID."))
}

/// Validates a create body; every invalid field is named.
fn parse_new_trip(body: &[u8], customer_id: &str) -> Result<NewTrip, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("body", format!("The request body is not valid JSON: {e}")))?;
    let Value::Object(f) = value else {
        return Err(ApiError::invalid("body", "The request body must be a JSON object."));
    };
    let mut errors = Vec::new();
    let category = uuid_field(&f, "vehicle_category_id", &mut errors);
    let trip_type = match f.get("type").and_then(Value::as_str).unwrap_or("ride_request") {
        "ride_request" => Some(TripType::Ride),
        "parcel" => Some(TripType::Parcel),
        _ => {
            errors.push(FieldError::new("type", "The type must be ride_request or parcel."));
            None
        }
    };
    let fare = match f.get("estimated_fare").and_then(Value::as_f64) {
        Some(fare) if fare.is_finite() && (0.0..=1_000_000.0).contains(&fare) => Some((fare * 100.0).round() as i64),
        _ => {
            errors.push(FieldError::new(
                "estimated_fare",
                "The estimated_fare must be a number between 0 and 1000000.",
            ));
            None
        }
    };
    let mut offered_to = Vec::new();
    match f.get("offered_to") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) if items.len() <= 1000 => {
            for item in items {
                match item.as_str().and_then(|s| uuid::Uuid::parse_str(s).ok()) {
                    Some(id) => offered_to.push(id.to_string()),
                    None => {
                        errors.push(FieldError::new(
                            "offered_to",
                            "The offered_to must hold driver id strings (UUIDs).",
                        ));
                        break;
                    }
                }
            }
        }
        Some(_) => errors.push(FieldError::new(
            "offered_to",
            "The offered_to must be an array of at most 1000 driver ids.",
        )),
    }
    let pickup = point(&f, "pickup", &mut errors);
    let destination = point(&f, "destination", &mut errors);
    let receiver = match (trip_type, f.get("receiver")) {
        (Some(TripType::Parcel), Some(Value::Object(r))) => {
            let name = r.get("name").and_then(Value::as_str).filter(|s| !s.trim().is_empty());
            let phone = r.get("phone").and_then(Value::as_str).filter(|s| !s.trim().is_empty());
            match (name, phone) {
                (Some(name), Some(phone)) => Some(Receiver {
                    name: name.to_owned(),
                    phone: phone.to_owned(),
                }),
                _ => {
                    errors.push(FieldError::new("receiver", "The receiver needs a name and a phone."));
                    None
                }
            }
        }
        (Some(TripType::Parcel), _) => {
            errors.push(FieldError::new(
                "receiver",
                "A parcel trip needs a receiver {name, phone}.",
            ));
            None
        }
        _ => None,
    };
    let bid_on_fare = match f.get("bid_on_fare") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            errors.push(FieldError::new("bid_on_fare", "The bid_on_fare must be true or false."));
            false
        }
    };
    match (category, trip_type, fare, pickup, destination) {
        (Some(vehicle_category_id), Some(trip_type), Some(estimated_fare_cents), Some(pickup), Some(destination))
            if errors.is_empty() =>
        {
            Ok(NewTrip {
                customer_id: customer_id.to_owned(),
                vehicle_category_id,
                trip_type,
                estimated_fare_cents,
                offered_to,
                pickup,
                destination,
                receiver,
                bid_on_fare,
            })
        }
        _ => Err(ApiError::Invalid(errors)),
    }
}

fn point(f: &Map<String, Value>, name: &str, errors: &mut Vec<FieldError>) -> Option<LatLng> {
    let p = f.get(name).and_then(Value::as_object);
    let lat = p
        .and_then(|p| p.get("lat"))
        .and_then(Value::as_f64)
        .filter(|v| (-90.0..=90.0).contains(v));
    let lng = p
        .and_then(|p| p.get("lng"))
        .and_then(Value::as_f64)
        .filter(|v| (-180.0..=180.0).contains(v));
    match (lat, lng) {
        (Some(lat), Some(lng)) => Some(LatLng { lat, lng }),
        _ => {
            errors.push(FieldError::new(
                name,
                format!("The {name} must be {{\"lat\": -90..90, \"lng\": -180..180}}."),
            ));
            None
        }
    }
}
