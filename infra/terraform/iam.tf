# IAM roles for the Kubernetes ServiceAccounts (IRSA), least privilege: each role may be assumed
# only by its own ServiceAccount and may touch only its own prefixes of this one bucket.
#   <name>-ray     Ray head and workers: read shards/ and weights/, read and write ray/
#   <name>-mlflow  MLflow tracking server: read and write mlflow/ (artifacts are proxied through
#                  it, so no other pod needs access to mlflow/)
# Shards are written from a workstation with your own credentials (`geco data shard`).

locals {
  oidc_provider_host = element(split("oidc-provider/", var.oidc_provider_arn), 1)

  workloads = {
    ray = {
      service_account = var.ray_service_account
      read_prefixes   = [local.prefixes.shards, local.prefixes.weights, local.prefixes.ray]
      write_prefixes  = [local.prefixes.ray]
    }
    mlflow = {
      service_account = var.mlflow_service_account
      read_prefixes   = [local.prefixes.mlflow]
      write_prefixes  = [local.prefixes.mlflow]
    }
  }
}

data "aws_iam_policy_document" "assume" {
  for_each = local.workloads

  statement {
    sid     = "ServiceAccount"
    effect  = "Allow"
    actions = ["sts:AssumeRoleWithWebIdentity"]

    principals {
      type        = "Federated"
      identifiers = [var.oidc_provider_arn]
    }

    condition {
      test     = "StringEquals"
      variable = "${local.oidc_provider_host}:sub"
      values   = ["system:serviceaccount:${var.namespace}:${each.value.service_account}"]
    }

    condition {
      test     = "StringEquals"
      variable = "${local.oidc_provider_host}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "access" {
  for_each = local.workloads

  # Listing only under the workload's prefixes (the prefix itself for "is it a folder?" checks).
  statement {
    sid       = "List"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.geco.arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values = flatten([
        for p in each.value.read_prefixes : [p, "${p}/*"]
      ])
    }
  }

  statement {
    sid       = "BucketLocation"
    effect    = "Allow"
    actions   = ["s3:GetBucketLocation"]
    resources = [aws_s3_bucket.geco.arn]
  }

  statement {
    sid       = "Read"
    effect    = "Allow"
    actions   = ["s3:GetObject"]
    resources = [for p in each.value.read_prefixes : "${aws_s3_bucket.geco.arn}/${p}/*"]
  }

  statement {
    sid    = "Write"
    effect = "Allow"
    actions = [
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = [for p in each.value.write_prefixes : "${aws_s3_bucket.geco.arn}/${p}/*"]
  }

  # SSE-KMS only: use of the bucket's key, and only through S3.
  dynamic "statement" {
    for_each = var.kms_key_arn == null ? [] : [var.kms_key_arn]

    content {
      sid       = "BucketKey"
      effect    = "Allow"
      actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
      resources = [statement.value]

      condition {
        test     = "StringEquals"
        variable = "kms:ViaService"
        values   = ["s3.${var.region}.amazonaws.com"]
      }
    }
  }
}

resource "aws_iam_role" "workload" {
  for_each = local.workloads

  name                 = "${var.name}-${each.key}"
  description          = "geco ${each.key}: ServiceAccount ${var.namespace}/${each.value.service_account} on bucket ${var.bucket_name}"
  assume_role_policy   = data.aws_iam_policy_document.assume[each.key].json
  max_session_duration = 3600
}

resource "aws_iam_role_policy" "workload" {
  for_each = local.workloads

  name   = "${var.name}-${each.key}-s3"
  role   = aws_iam_role.workload[each.key].id
  policy = data.aws_iam_policy_document.access[each.key].json
}
