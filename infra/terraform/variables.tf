variable "region" {
  description = "AWS region of the bucket (and of the EKS cluster that reads it)."
  type        = string
  default     = "us-east-1"
}

variable "bucket_name" {
  description = "Name of the S3 bucket for shards, weights, Ray checkpoints and MLflow artifacts (globally unique)."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "The bucket_name must be a valid S3 bucket name: 3-63 lowercase letters, digits, dots and hyphens."
  }
}

variable "name" {
  description = "Prefix of the IAM roles: <name>-ray and <name>-mlflow (the ServiceAccount annotations of k8s/overlays/gpu-cluster use geco-ray and geco-mlflow)."
  type        = string
  default     = "geco"
}

variable "oidc_provider_arn" {
  description = "ARN of the EKS cluster's IAM OIDC provider (IRSA), e.g. arn:aws:iam::111122223333:oidc-provider/oidc.eks.us-east-1.amazonaws.com/id/EXAMPLE."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:iam::[0-9]{12}:oidc-provider/.+$", var.oidc_provider_arn))
    error_message = "The oidc_provider_arn must be an IAM OIDC provider ARN (arn:aws:iam::ACCOUNT:oidc-provider/HOST/PATH)."
  }
}

variable "namespace" {
  description = "Kubernetes namespace of the ServiceAccounts (the kustomize namespace of k8s/)."
  type        = string
  default     = "geco"
}

variable "ray_service_account" {
  description = "ServiceAccount of the Ray head and worker pods."
  type        = string
  default     = "geco-ray"
}

variable "mlflow_service_account" {
  description = "ServiceAccount of the MLflow tracking server."
  type        = string
  default     = "geco-mlflow"
}

variable "kms_key_arn" {
  description = "KMS key for SSE-KMS on the bucket; null = SSE-S3 (AES256). The roles get use of this key only."
  type        = string
  default     = null
}

variable "checkpoint_expiration_days" {
  description = "Days after which objects under ray/ (Ray Train checkpoints and results) expire; registered models keep their own copy under mlflow/."
  type        = number
  default     = 90
}

variable "noncurrent_version_expiration_days" {
  description = "Days a replaced or deleted object version is kept (versioning) before it expires."
  type        = number
  default     = 30
}

variable "checkpoint_noncurrent_expiration_days" {
  description = "Days an old version of a checkpoint object is kept: Ray deletes checkpoints beyond num_to_keep, versioning keeps them this long."
  type        = number
  default     = 7
}

variable "force_destroy" {
  description = "Allow `terraform destroy` to delete a non-empty bucket (all data!)."
  type        = bool
  default     = false
}

variable "tags" {
  description = "Extra tags for every resource."
  type        = map(string)
  default     = {}
}
